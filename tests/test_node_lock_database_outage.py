"""A PostgreSQL outage under a running `dicom-node serve`: it lost its lock and stopped with exit code 0, saying
another node held the database, so `Restart=on-failure` never started it again. It now says the server cannot be
reached and exits 1. The outage is a real TCP relay in front of a real PostgreSQL, cut off while serve runs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.conftest import DICOM_NODE, free_port, wait_for

pytestmark = pytest.mark.integration


class Relay:
    """Forwards TCP connections from a local port to PostgreSQL until cut off (then every connection closes and
    nothing listens)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():  # woken by the cut itself
                client.close()
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass

    def cut_off(self) -> None:
        self.cut.set()
        for sock in [self.listener, *self.sockets]:  # shut down first: a close alone wakes no blocked accept
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_serve_that_loses_its_database_server_says_so_and_exits_1(tmp_path: Path, postgresql_url: str):
    url = make_url(postgresql_url)
    relay = Relay(url.host or "127.0.0.1", int(url.port or 5432))
    relayed = url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "network": {"ae_title": "OUTAGE", "host": "127.0.0.1", "port": free_port()},
                "storage": {"directory": str(tmp_path / "storage")},
                "database": {"url": relayed},
                "inference": {"workers": 0},
                "receive": {"processes": 1},
                "logging": {"format": "text"},
            }
        )
    )
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        serve = subprocess.Popen([DICOM_NODE, "serve", "--config", str(config)], stdout=output, stderr=output)
    try:
        wait_for(lambda: "node.ready" in log.read_text(), timeout=120, what="serve to start")
        relay.cut_off()
        code = serve.wait(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    said = " ".join(log.read_text().split())
    assert code == 1, said[-2000:]
    assert "the database server cannot be reached to take the lock again" in said, said[-2000:]
    assert "another dicom-node serve holds the database now" not in said
    assert (
        "stopped: dicom-node serve OUTAGE on " in said and "start it again, it waits until it can take the lock" in said
    )

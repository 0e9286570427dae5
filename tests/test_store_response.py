"""C-STORE responses encoded without pydicom are byte for byte what pynetdicom sends (dicom_node.store_response)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom._globals import DEFAULT_MAX_LENGTH
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node import store_response
from dicom_node.config import NetworkSettings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive import scp
from dicom_node.security import start_guarded_server
from dicom_node.store_response import DirectStoreResponses, encode_store_response
from tests.conftest import changed_sources, free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
PYNETDICOM_SEND_MSG = "a839cf2fb46976d9"
"""A hash of pynetdicom 3.0.4's ``DIMSEServiceProvider.send_msg``, whose work the direct path does for plain responses."""


def test_pynetdicom_sends_messages_the_way_the_direct_path_was_written_against():
    assert not changed_sources({DIMSEServiceProvider.send_msg: PYNETDICOM_SEND_MSG}), (
        "pynetdicom changed DIMSEServiceProvider.send_msg: compare it with DirectStoreResponses.send_msg in "
        "dicom_node/store_response.py (events, fragmenting), bring that in line, then update PYNETDICOM_SEND_MSG"
    )


def _response(**values: Any) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = values.pop("message_id", 7)
    primitive.AffectedSOPClassUID = values.pop("sop_class", CT)
    primitive.AffectedSOPInstanceUID = values.pop("sop_instance", "1.2.826.0.1.3680043.8.498.1")
    primitive.Status = values.pop("status", 0x0000)
    for keyword, value in values.items():
        setattr(primitive, keyword, value)
    return primitive


def _pynetdicom_bytes(primitive: C_STORE) -> bytes:
    """The command set pynetdicom sends for ``primitive``: its one PDV, without the message control header."""
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = message.encode_msg(1, 0)
    (context_id, value) = pdata.presentation_data_value_list[0]
    assert context_id == 1 and value[:1] == b"\x03"
    return bytes(value[1:])


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"sop_instance": "1.2.3.4"},  # even length: no padding
        {"sop_instance": "1.2.3.45"},  # odd length: one NUL
        {"sop_instance": "1." + "2" * 62},  # 64 characters, the longest UID
        {"message_id": 0},
        {"message_id": 0xFFFF},
        {"status": 0xB000},  # warning: coercion of data elements
        {"status": 0xA700, "ErrorComment": "out of disk space on the node"},  # odd length: one space
        {"status": 0xC000, "ErrorComment": "Cannot understand: the reason is in the node's log!"},
        {"status": 0xA900, "ErrorComment": "x" * 64},
        {"status": 0xC000, "ErrorComment": ""},
        {"status": 0x0000, "sop_class": "1.2.840.10008.5.1.4.1.1.88.22"},
    ],
    ids=lambda values: ",".join(f"{k}={str(v)[:12]}" for k, v in values.items()) or "success",
)
def test_plain_responses_are_byte_identical_to_pynetdicom(values):
    primitive = _response(**values)

    assert encode_store_response(primitive) == _pynetdicom_bytes(primitive)


@pytest.mark.parametrize(
    "values",
    [
        {"OffendingElement": [0x00100010]},
        {"ErrorComment": "Fehler: Größe"},  # not ASCII: pydicom's character handling decides
        {"ErrorComment": "line\nbreak"},
        {"sop_instance": "1.2.3.A"},  # not a UID of digits and dots
    ],
    ids=["offending-element", "non-ascii-comment", "control-character", "letter-in-uid"],
)
def test_other_responses_are_left_to_pynetdicom(values):
    assert encode_store_response(_response(**values)) is None


@dataclass
class StoreServer:
    """The node's guarded server in this process, answering each C-STORE with the next of ``answers``."""

    network: NetworkSettings
    answers: list[Any] = field(default_factory=list)
    associations: list[Any] = field(default_factory=list)  # the accepted associations, one entry per C-STORE
    received_pdus: list[Any] = field(default_factory=list)  # the P-DATA-TF PDUs the requestor received

    def _keep_data_pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            self.received_pdus.append(event.pdu)

    def on_store(self, event: evt.Event) -> Any:
        self.associations.append(event.assoc)
        return self.answers.pop(0)

    def send(self, files: list[Path], maximum_pdu_size: int | None = None) -> list[Dataset]:
        """Each file's C-STORE response command set as the requestor decoded it, over one association.

        ``maximum_pdu_size``: the largest PDU the requestor accepts (pynetdicom's default when None);
        the P-DATA PDUs it receives are kept in :attr:`received_pdus`.
        """
        received: list[Dataset] = []
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(
            self.network.host,
            self.network.port,
            ae_title=self.network.ae_title,
            max_pdu=DEFAULT_MAX_LENGTH if maximum_pdu_size is None else maximum_pdu_size,
            evt_handlers=[
                (evt.EVT_DIMSE_RECV, lambda event: received.append(event.message.command_set)),
                (evt.EVT_PDU_RECV, self._keep_data_pdu),
            ],
        )
        assert assoc.is_established
        try:
            for message_id, path in enumerate(files, start=1):
                assoc.send_c_store(dcmread(path), msg_id=message_id)
        finally:
            assoc.release()
        return received


@pytest.fixture
def start_server() -> Iterator[Callable[..., StoreServer]]:
    servers = []

    def start(*handlers: Any) -> StoreServer:
        network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
        running = StoreServer(network)
        bound = [(evt.EVT_C_STORE, running.on_store), *handlers]
        servers.append(start_guarded_server(scp.build_ae(network), (network.host, network.port), network, bound))
        return running

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def encoded(monkeypatch) -> list[bytes | None]:
    """What each directly encoded response came to (None: left to pynetdicom), in order."""
    results: list[bytes | None] = []

    def counting(primitive: C_STORE) -> bytes | None:
        results.append(encode_store_response(primitive))
        return results[-1]

    monkeypatch.setattr(store_response, "encode_store_response", counting)
    return results


@pytest.fixture
def sent_by_pynetdicom(monkeypatch) -> list[str]:
    """The responses left to pynetdicom's own encoding, by primitive class name (the requests the test's
    requestor sends, in this same process, are not counted)."""
    names: list[str] = []
    original = DIMSEServiceProvider.send_msg

    def counting(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        if primitive.MessageIDBeingRespondedTo is not None:
            names.append(type(primitive).__name__)
        original(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", counting)
    return names


def test_peers_receive_the_directly_encoded_responses(start_server, encoded, sent_by_pynetdicom, tmp_path):
    server = start_server()
    refusal = Dataset()
    refusal.Status = 0xA700
    refusal.ErrorComment = "out of disk space on the node"
    server.answers.extend([0x0000, refusal, 0xB000])
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=3))

    responses = server.send(series.files)

    assert [int(r.Status) for r in responses] == [0x0000, 0xA700, 0xB000]
    assert responses[1].ErrorComment == "out of disk space on the node"
    assert [r.AffectedSOPInstanceUID for r in responses] == [dcmread(p).SOPInstanceUID for p in series.files]
    assert [r.AffectedSOPClassUID for r in responses] == [CT] * 3
    assert [r.MessageIDBeingRespondedTo for r in responses] == [1, 2, 3]
    assert [r.CommandField for r in responses] == [0x8001] * 3
    assert len(encoded) == 3 and all(encoded)
    assert sent_by_pynetdicom == []  # each response went the direct way
    assert all(isinstance(association.dimse, DirectStoreResponses) for association in server.associations)


def _store_response_length(path: Path) -> int:
    """How long the node's success response to a C-STORE of ``path`` (message ID 1) encodes."""
    dataset = dcmread(path)
    primitive = _response(message_id=1, sop_class=dataset.SOPClassUID, sop_instance=dataset.SOPInstanceUID)
    response = encode_store_response(primitive)
    assert response is not None
    return len(response)


def test_a_response_too_long_for_the_peer_s_pdus_is_left_to_pynetdicom(start_server, sent_by_pynetdicom, tmp_path):
    server = start_server()
    server.answers.extend([0x0000, 0x0000])
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=1))
    length = _store_response_length(series.files[0])

    fits = server.send(series.files, maximum_pdu_size=length + 6)  # the PDV item's header takes 6 bytes
    pdus_when_it_fits = list(server.received_pdus)
    server.received_pdus.clear()
    too_long = server.send(series.files, maximum_pdu_size=length + 5)

    assert [int(r.Status) for r in fits + too_long] == [0x0000, 0x0000]
    assert sent_by_pynetdicom == ["C_STORE"]  # only the second response
    assert [len(pdu.presentation_data_value_items) for pdu in pdus_when_it_fits] == [1]
    assert [_pdv_list_length(pdu) for pdu in pdus_when_it_fits] == [length + 6]  # exactly the maximum
    fragments = [item for pdu in server.received_pdus for item in pdu.presentation_data_value_items]
    assert len(fragments) == 2  # pynetdicom split the command set in two
    assert all(_pdv_list_length(pdu) <= length + 5 for pdu in server.received_pdus)


def _pdv_list_length(pdu: P_DATA_TF) -> int:
    """What the Maximum Length item limits (PS3.8 D.1): each PDV item's 4-byte length, context ID and value."""
    return sum(4 + 1 + len(item.presentation_data_value) for item in pdu.presentation_data_value_items)


def test_a_listener_on_sent_messages_still_gets_pynetdicom_s_messages(
    start_server, encoded, sent_by_pynetdicom, tmp_path
):
    sent: list[Any] = []
    server = start_server((evt.EVT_DIMSE_SENT, lambda event: sent.append(event.message)))
    server.answers.append(0x0000)
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=1))

    (response,) = server.send(series.files)

    assert int(response.Status) == 0x0000
    assert [type(message).__name__ for message in sent] == ["C_STORE_RSP"]
    assert sent[0].command_set.Status == 0x0000
    assert sent_by_pynetdicom == ["C_STORE"]

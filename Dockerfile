# dicom-node: the CT auto-segmentation DICOM node (Storage SCP, series tracking, routing, inference workers).
#
#   docker build -t dicom-node .
#   docker run -d --name dicom-node -p 11112:11112 -v dicom-node-data:/data dicom-node
#
# Configuration: /etc/dicom-node/config.yaml (mount your own over it) and DICOM_NODE_* environment
# variables, e.g. the PACS as a peer by AE title and address (never by AE title alone), and loopback for the
# healthcheck:
#   -e DICOM_NODE_PEERS='{"pacs": {"ae_title": "PACS", "hosts": ["192.0.2.10"], "roles": ["store", "echo"]},
#                         "health": {"hosts": ["127.0.0.1"], "roles": ["echo"]}}'
# (README.md, "Docker" and "Peers and roles").
FROM python:3.11-slim-bookworm

# No apt packages: every dependency (pydicom, pynetdicom, python-gdcm, pylibjpeg-openjpeg, pyjpegls,
# numpy, SQLAlchemy, ...) installs from a manylinux wheel. DCMTK is a test tool, not a runtime need.

RUN groupadd --system --gid 10001 dicomnode \
 && useradd --system --uid 10001 --gid dicomnode --no-create-home --home-dir /data \
        --shell /usr/sbin/nologin dicomnode

WORKDIR /usr/src/dicom-node
COPY pyproject.toml README.md ./
COPY dicom_node/ dicom_node/
COPY db/ db/
COPY inference/ inference/
# The TotalSegmentator extra brings torch (a CUDA build from PyPI: the container can use a GPU);
# the postgresql extra the driver for a shared PostgreSQL (docker-compose.yml: workers on GPU hosts).
RUN pip install --no-cache-dir --disable-pip-version-check ".[totalsegmentator,postgresql]" \
 && cd / && rm -rf /usr/src/dicom-node

COPY config.yaml /etc/dicom-node/config.yaml

# Created and chowned before VOLUME, so a new named volume starts out writable by the node's user.
RUN mkdir -p /data && chown dicomnode:dicomnode /data

# DICOM_NODE_CONFIG: `docker exec <container> dicom-node status` (and the healthcheck) read the same
# configuration as the server. An absolute storage directory overrides the file's relative `data`.
ENV DICOM_NODE_CONFIG=/etc/dicom-node/config.yaml \
    DICOM_NODE_STORAGE__DIRECTORY=/data
VOLUME /data
WORKDIR /data
USER dicomnode

# 11112: DICOM. 8080: the operations console (console.enabled; bind it with
# DICOM_NODE_CONSOLE__HOST=0.0.0.0 and publish it behind HTTPS or a reverse proxy).
EXPOSE 11112 8080

# The console's /readyz (database reachable, DICOM port listening, a worker alive) when the console is
# on; otherwise a real C-ECHO to the node's own port with its own AE title as calling AE (if
# network.allowed_calling_ae_titles is set, it must include that title). See dicom_node/console/health.py.
HEALTHCHECK --interval=60s --timeout=15s --start-period=60s --retries=3 \
    CMD ["python", "-m", "dicom_node.console.health"]

ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/etc/dicom-node/config.yaml"]

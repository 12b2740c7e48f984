"""The node's DICOM networking with pynetdicom 3: the Storage + Verification SCP that receives studies, and
the Storage SCU that sends SR + SEG back.

Who may connect is decided when the association is requested (``EVT_REQUESTED``): the calling AE title
must be on the allow-list *and* come from that peer's host (pynetdicom's ``require_calling_aet`` checks only
the title), the called AE title must be ours, and the work queue must have room. A refusal is an
A-ASSOCIATE-RJ with the matching reason (calling AE not recognised; called AE not recognised; transient
"local limit exceeded" when the queue is full), logged and written to the audit log: never a silent drop.

TLS (optional, both ways): TLS 1.2 minimum, our certificate and key, optionally client certificates
verified against ``ca_certificates`` when receiving, and the PACS' certificate verified against it when
sending.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification

from apps.dicom_node.config import NodeConfig, Peer

logger = logging.getLogger(__name__)

# the transfer syntaxes we offer when sending (our SR and SEG are written Explicit VR Little Endian)
SEND_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
# A-ASSOCIATE-RJ (result, source, diagnostic) of PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)


def server_ssl_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """The receiving side's TLS context (None without TLS)."""
    t = cfg.tls
    if not t.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(t.certificate), str(t.private_key))
    if t.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(t.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_certificate else ssl.CERT_NONE
    return ctx


def client_ssl_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """The sending side's TLS context: verifies the PACS' certificate against ``ca_certificates`` (the
    system's store without it), presents ours (PACS such as Orthanc require a client certificate)."""
    t = cfg.tls
    if not t.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(t.ca_certificates) if t.ca_certificates else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = t.verify_peer_hostname
    ctx.load_cert_chain(str(t.certificate), str(t.private_key))
    return ctx


class Receiver:
    """The Storage SCP. ``on_instance(study, series, sop, bytes, peer)`` stores one instance,
    ``on_released(series_keys, peer)`` is told which series an association brought, ``backlog()`` gives the
    number of queued series, ``audit(record)`` writes an audit line."""

    def __init__(self, cfg: NodeConfig, on_instance: Callable[..., Any], on_released: Callable[..., Any],
                 backlog: Callable[[], int], audit: Callable[[dict], None]) -> None:
        self.cfg, self.on_instance, self.on_released, self.backlog, self.audit = (cfg, on_instance, on_released,
                                                                                   backlog, audit)
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.supported_contexts = StoragePresentationContexts
        self.ae.add_supported_context(Verification)
        # pynetdicom's own check of the calling AE title (ours below adds the host) and of the called one
        self.ae.require_calling_aet = [p.ae_title for p in cfg.peers]
        self.ae.require_called_aet = True
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self.ae, name, cfg.network_timeout_seconds)
        self.server = None
        self._assoc: dict[int, dict[str, Any]] = {}

    def start(self) -> None:
        handlers = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_ECHO, self._echo),
                    (evt.EVT_C_STORE, self._store), (evt.EVT_RELEASED, self._ended), (evt.EVT_ABORTED, self._ended)]
        self.server = self.ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers,
                                           ssl_context=server_ssl_context(self.cfg))
        logger.info("listening as %s on %s:%d%s", self.cfg.ae_title, self.cfg.host, self.cfg.port,
                    " (TLS)" if self.cfg.tls.enabled else "")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ------------------------------------------------------------------ handlers
    def _peer_of(self, assoc) -> dict[str, Any]:
        rq = assoc.requestor.primitive  # the A-ASSOCIATE-RQ: at EVT_REQUESTED the titles are only there
        return {"calling_ae": str(rq.calling_ae_title).strip(), "host": assoc.requestor.address,
                "called_ae": str(rq.called_ae_title).strip()}

    def _reject(self, assoc, code: tuple[int, int, int], reason: str, peer: dict[str, Any]) -> None:
        logger.warning("association from %s@%s refused: %s", peer["calling_ae"], peer["host"], reason)
        self.audit({"event": "association_refused", **peer, "reason": reason})
        assoc.acse.send_reject(*code)
        assoc.kill()  # as pynetdicom's own rejection does: waits until the A-ASSOCIATE-RJ is out, then ends

    def _requested(self, event) -> None:
        assoc = event.assoc
        peer = self._peer_of(assoc)
        called = peer["called_ae"]
        if self.cfg.peer(peer["calling_ae"], peer["host"]) is None:
            self._reject(assoc, REJECT_CALLING_AE, "calling AE title and host are not on the allow-list", peer)
        elif called != self.cfg.ae_title:
            self._reject(assoc, REJECT_CALLED_AE, f"called AE title {called!r} is not ours ({self.cfg.ae_title})",
                         peer)
        elif self.backlog() >= self.cfg.max_queued_series:
            self._reject(assoc, REJECT_BUSY, f"work queue full ({self.backlog()} series >= queue.max_series "
                         f"{self.cfg.max_queued_series}); try again later", peer)
        else:
            self._assoc[id(assoc)] = {"peer": peer, "series": set(), "instances": 0, "start": time.time()}

    def _echo(self, event) -> int:
        return 0x0000

    def _store(self, event) -> int:
        state = self._assoc.get(id(event.assoc))
        if state is None:  # refused association (should not get here)
            return 0xA700
        try:
            ds = event.dataset
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            sop = str(event.request.AffectedSOPInstanceUID)
            data = event.encoded_dataset(include_meta=True)
        except Exception as e:  # noqa: BLE001 -- an undecodable instance is refused, the association goes on
            logger.warning("instance from %s not stored: %s", state["peer"]["calling_ae"], e)
            return 0xC000
        try:
            self.on_instance(study, series, sop, data, state["peer"])
        except OSError as e:
            logger.error("cannot write instance %s: %s", sop, e)
            return 0xA700  # out of resources
        state["series"].add((study, series))
        state["instances"] += 1
        return 0x0000

    def _ended(self, event) -> None:
        state = self._assoc.pop(id(event.assoc), None)
        if state is None:
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        self.audit({"event": f"association_{how}", **state["peer"], "instances": state["instances"],
                    "series": sorted(s for _, s in state["series"]), "seconds": round(time.time() - state["start"], 3)})
        if how == "released":
            self.on_released(sorted(state["series"]), state["peer"])


def send_files(cfg: NodeConfig, dest: Peer, files: Sequence[Path]) -> tuple[bool, str]:
    """C-STORE ``files`` to ``dest`` in one association, proposing a context for each file's SOP class (SR
    and SEG are missing from most default lists). Returns (all stored, what happened)."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=cfg.ae_title)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, name, cfg.network_timeout_seconds)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, list(SEND_SYNTAXES))
    ctx = client_ssl_context(cfg)
    tls_args = (ctx, dest.host) if ctx is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as e:
        return False, f"cannot connect to {dest.ae_title}@{dest.host}:{dest.port}: {e}"
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "not established (peer not listening, or it aborted)"
        return False, f"{dest.ae_title}@{dest.host}:{dest.port}: association {why}"
    try:
        for f, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                return False, f"{f.name}: no C-STORE response (connection lost or timed out)"
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                return False, f"{f.name}: C-STORE status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    return True, f"{len(files)} object(s) stored at {dest.ae_title}@{dest.host}:{dest.port}"

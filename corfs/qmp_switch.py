"""Re-point a running QEMU's block nodes from one file (OLD, on the mount) to another (NEW, the
same bytes elsewhere), live, over QMP. Synchronous: the daemon calls it from a worker thread.

What QEMU 7.2 tells and does (tried here):
- `query-named-block-nodes {"flat": true}` gives each node's name, driver, file name, `ro`,
  `cache` (direct, no-flush) and `detect_zeroes`; `x-debug-query-block-graph` gives the parent
  edges (which node is whose `file` or `backing`). Nothing in 7.2 reports `discard`, `aio`,
  `locking`, `auto-read-only` or `force-share`: the caller passes those it knows (libvirt's
  command line: qemu_cmdline.py) as `started`, per old file node, else QEMU's defaults apply
  to the nodes we make.
  `detect-zeroes: unmap` implies `discard: unmap` (QEMU refuses the one without the other).
- `blockdev-reopen` resets every option it is not given, so the parent gets back all of the
  above plus references to its other children. It drains in-flight I/O first.
- A node with an auto-generated name (`#block123`, every node of a plain `-drive`) refuses
  `blockdev-reopen` ("Cannot change the option 'node-name'"). Where such a raw node is the
  child of a named node (the backing of `-drive file=overlay.qcow2,node-name=X`), a new raw
  node replaces it in that reopen; where it is the root of a `-drive` (a BlockBackend), a
  `blockdev-mirror` with `"sync": "none"` onto a new raw node (nothing to copy: NEW holds the
  bytes) and `block-job-complete` swap it. An auto-named qcow2 overlay over OLD cannot be
  switched: refused at plan time, naming `node-name=` as the way.
- QEMU's image locks are OFD locks on the inode: OLD and NEW must be different inodes (in
  production OLD is the FUSE file, NEW the cache's data file), or the new node's locks
  conflict with the old one's.

All or nothing: `switch` undoes what it did when a step fails (reopens back, mirrors back,
deletes the nodes it added) and raises SwitchFailed naming the step and QEMU's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError

from .errors import NoNodesOnPath, QmpError, SwitchFailed

log = logging.getLogger(__name__)

JOB_TIMEOUT = 30.0  # a sync=none mirror is ready at once; this bounds a hung drain
REOPENABLE = ("raw", "qcow2")  # drivers whose every option we can give back
T = TypeVar("T")


class Monitor(Protocol):
    """One QMP connection."""

    def command(self, name: str, arguments: dict | None = None) -> Any:
        """Run one QMP command; raise QmpError with QEMU's message when it fails."""
        ...


class SocketMonitor:
    """A QMP connection over QEMU's unix socket (qemu.qmp's client on a private event loop,
    so that connect and every command are bounded by `timeout`)."""

    def __init__(self, path: str, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(os.path.basename(path))

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, self._timeout))
        except TimeoutError:
            raise QmpError(f"{self._path}: no answer to {what} in {self._timeout:g} s") from None

    def connect(self) -> None:
        try:
            try:
                # qemu.qmp logs a failed session as errors of its own: this one is met below
                with _silenced(self._client.logger):
                    self._run(self._client.connect(self._path), "the QMP greeting")
            except ConnectError as e:
                if not isinstance(e.exc, GreetingError):
                    raise
                # QEMU 7.2 sends events to a QMP monitor from its start, and a first client
                # whose connection is accepted just before the open handler runs gets an
                # event ahead of the greeting (seen: RESUME at boot). A second connection
                # gets the greeting first; something that is not QEMU fails again.
                log.debug("QMP %s: %s; connecting again", self._path, e)
                self._run(self._client.connect(self._path), "the QMP greeting")
        except ConnectError as e:
            self.close()
            cause = e.exc if isinstance(e.exc, OSError) else None
            if isinstance(cause, FileNotFoundError):
                raise QmpError(f"{self._path}: no QMP socket there") from None
            if isinstance(cause, ConnectionRefusedError):
                raise QmpError(f"{self._path}: connection refused (is QEMU running?)") from None
            raise QmpError(f"{self._path}: not a QEMU QMP socket ({e})") from None
        except QmpError:
            self.close()
            raise

    def command(self, name: str, arguments: dict | None = None) -> Any:
        try:
            return self._run(self._client.execute(name, arguments), name)
        except ExecuteError as e:
            raise QmpError(str(e)) from None
        except QMPError as e:
            raise QmpError(f"{self._path}: QMP connection failed during {name}: {e}") from None

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._client.disconnect())
        except (QMPError, OSError) as e:
            log.debug("QMP disconnect from %s: %s", self._path, e)
        finally:
            self._loop.close()


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    """Nothing `logger` says gets out meanwhile (what matters is raised, and said by the
    caller)."""
    drop = _DropAll()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def connect_socket(path: str, timeout: float) -> SocketMonitor:
    monitor = SocketMonitor(path, timeout)
    monitor.connect()
    return monitor


# ---- what QEMU holds -------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    driver: str
    filename: str
    options: dict  # the common options to give back: read-only, cache, detect-zeroes[, discard]


@dataclass(frozen=True)
class Edge:
    parent: str
    parent_type: str  # block-driver, block-backend, block-job
    child_name: str  # the edge: file, backing, root, ...


@dataclass(frozen=True)
class Graph:
    nodes: dict[str, Node]
    parents: dict[str, list[Edge]]  # by child node name
    children: dict[str, dict[str, str]]  # parent node name -> edge name -> child node name


def _common_options(info: Mapping) -> dict:
    cache = info["cache"]
    options = {
        "read-only": bool(info["ro"]),
        "cache": {"direct": bool(cache["direct"]), "no-flush": bool(cache["no-flush"])},
        "detect-zeroes": info["detect_zeroes"],
    }
    if info["detect_zeroes"] == "unmap":
        options["discard"] = "unmap"  # QEMU refuses detect-zeroes=unmap without it
    return options


def read_graph(monitor: Monitor) -> Graph:
    infos = monitor.command("query-named-block-nodes", {"flat": True})
    nodes = {
        i["node-name"]: Node(i["node-name"], i["drv"], i["file"], _common_options(i))
        for i in infos
    }
    graph = monitor.command("x-debug-query-block-graph")
    by_id = {n["id"]: n for n in graph["nodes"]}
    parents: dict[str, list[Edge]] = {}
    children: dict[str, dict[str, str]] = {}
    for e in graph["edges"]:
        parent, child = by_id[e["parent"]], by_id[e["child"]]
        parents.setdefault(child["name"], []).append(
            Edge(parent["name"], parent["type"], e["name"])
        )
        if parent["type"] == "block-driver":
            children.setdefault(parent["name"], {})[e["name"]] = child["name"]
    return Graph(nodes, parents, children)


def same_path(a: str, b: str) -> bool:
    # A string comparison only: resolving a path on the mount from inside its daemon deadlocks.
    return os.path.normpath(a) == os.path.normpath(b)


def _file_nodes_on(graph: Graph, path: str) -> list[Node]:
    return [n for n in graph.nodes.values() if n.driver == "file" and same_path(n.filename, path)]


def nodes_on(monitor: Monitor, path: str) -> list[str]:
    """Names of the `file` nodes whose file name is `path`."""
    return [n.name for n in _file_nodes_on(read_graph(monitor), path)]


def drop_unused_nodes_on(monitor: Monitor, path: str) -> None:
    """Delete the nodes a switch added on `path` (its prefix's) that nothing uses: a switch
    cut off from QEMU could not undo them. One in use stays (QEMU refuses to delete it)."""
    for node in _file_nodes_on(read_graph(monitor), path):
        if node.name.startswith("corfs") and node.name.endswith("-f"):
            _delete_added_nodes(monitor, node.name.removesuffix("-f"))


def _delete_added_nodes(monitor: Monitor, prefix: str) -> None:
    """The nodes a switch step added (NewChild.add: PREFIX-r over PREFIX-f), where nothing
    uses them (QEMU refuses to delete one in use)."""
    for name in (f"{prefix}-r", f"{prefix}-f"):  # the format node first
        with contextlib.suppress(QmpError):
            monitor.command("blockdev-del", {"node-name": name})


StartedOf = Callable[[str], Mapping[str | None, tuple[Mapping, Mapping]]]


def _nothing_known(path: str) -> Mapping[str | None, tuple[Mapping, Mapping]]:
    return {}


def rename_backing(
    monitor: Monitor,
    old: str,
    new: str,
    changed: list[str],
    only: list[str] | None = None,
    started_of: StartedOf = _nothing_known,
) -> None:
    """Overlays whose image header names `old` as their backing file name `new` from now on,
    so that a restart opens NEW rather than the mount; each is added to `changed` as soon as
    it is (for an undo after a failure half-way). `only`: just these. Read-only overlays too
    (the middle of a snapshot chain, a readonly=on drive): QEMU reopens one read-write for
    the header, then read-only again; left alone, the chain never opened again. `started_of`:
    the options QEMU was started with for a file (qemu_cmdline.started_options), kept when a
    read-only file node is reopened read-write for the while."""
    graph = read_graph(monitor)
    for info in monitor.command("query-named-block-nodes", {"flat": True}):
        image = info.get("image", {})
        # The header's name (not the node's), as QEMU resolves it: a relative name in the
        # header ("mnt/disk.raw", beside the overlay) names the mount too.
        backing = image.get("full-backing-filename") or image.get("backing-filename")
        name = info["node-name"]
        if not backing or not same_path(backing, old) or (only is not None and name not in only):
            continue
        base = graph.children.get(name, {}).get("backing")
        if base is None:  # opened with backing: null: QEMU reads nothing through its header
            log.warning("overlay %s has no backing node: its header still names %s", name, old)
            continue
        with _file_writable(monitor, graph, name, started_of):
            _write_backing_name(monitor, name, base, new)
            changed.append(name)  # written: an undo must see it even if the reopen back fails


@contextlib.contextmanager
def _file_writable(
    monitor: Monitor, graph: Graph, overlay: str, started_of: StartedOf
) -> Iterator[None]:
    """The overlay's file node read-write meanwhile, if it was opened read-only by itself (a
    chain started node by node, as libvirt does): QEMU reopens a read-only overlay read-write
    to write its header, but not a file node under it whose read-only was given ("Block node
    is read-only"). Reopened as it was afterwards, with the options it was started with."""
    file_node = graph.nodes.get(graph.children.get(overlay, {}).get("file", ""))
    if file_node is None or file_node.driver != "file" or not file_node.options["read-only"]:
        yield
        return
    node_options, file_options = _started_for(file_node, started_of(file_node.filename))
    options = {"driver": "file", "node-name": file_node.name, "filename": file_node.filename,
               **_file_options(file_node, {**node_options, **file_options})}
    try:
        monitor.command("blockdev-reopen", {"options": [{**options, "read-only": False}]})
    except QmpError:  # QEMU reopens it by itself, if it can (a -drive's inherits read-only)
        yield
        return
    try:
        yield
    finally:
        try:
            monitor.command("blockdev-reopen", {"options": [options]})
        except QmpError as exc:  # left read-write: the lesser harm than undoing a handoff
            log.error("file node %s stays read-write (not reopened read-only: %s)",
                      file_node.name, exc)


_BACKING_JOB = "corfs-backing"


def _write_backing_name(monitor: Monitor, overlay: str, base: str, name: str) -> None:
    """Write `name` into `overlay`'s header as its backing file, with the format of `base`,
    the node it backs onto now: a block-stream whose base is the overlay's own backing node
    streams nothing and ends by writing both. (QEMU 7.2's change-backing-file writes the
    overlay's own format there instead, qcow2 for a raw DEST: no later open of the overlay
    worked.) While the job runs, its copy-on-read filter may copy what the guest reads from
    the backing file into the overlay: the same bytes, for a few milliseconds. One a killed
    daemon left would refuse this id: every connection that writes headers ends it first."""
    monitor.command("block-stream", {
        "job-id": _BACKING_JOB, "device": overlay, "base-node": base, "backing-file": name,
        "auto-dismiss": False,
    })
    try:
        _wait_job(monitor, _BACKING_JOB, "concluded")
        error = _job(monitor, _BACKING_JOB).get("error")
        if error:
            raise QmpError(f"{overlay}: backing file name {name} not written: {error}")
    finally:
        _end_job(monitor, _BACKING_JOB)


def end_header_job(monitor: Monitor) -> None:
    """No header job of ours left in QEMU (a daemon killed between its start and its
    dismissal leaves one): first thing on a new connection, since QEMU 7.2 drops a
    connection asked query-named-block-nodes while a concluded stream job is not dismissed."""
    _end_job(monitor, _BACKING_JOB)


def _end_job(monitor: Monitor, job: str) -> None:
    """No job `job` any more: cancelled if it still runs, then dismissed."""
    if _job(monitor, job).get("status") not in ("concluded", None):
        monitor.command("block-job-cancel", {"device": job, "force": True})
        _wait_job(monitor, job, "concluded")
    if _job(monitor, job):
        monitor.command("job-dismiss", {"id": job})


# ---- the plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class NewChild:
    """The nodes that replace one child: a file node, and a raw node over it when the child
    replaced is an auto-named raw node. Built for NEW, or for OLD again when undoing."""

    file_options: dict  # without node-name and filename
    raw_options: dict | None  # without node-name and file

    def add(
        self,
        monitor: Monitor,
        filename: str,
        prefix: str,
        done: list[str],
        file_node: str | None = None,
    ) -> str:
        """Add the nodes (over `file_node` when one on `filename` is already there) and
        return the name of the one that replaces the child."""
        file_name = file_node or f"{prefix}-f"
        if file_node is None:
            monitor.command(
                "blockdev-add",
                {
                    "driver": "file",
                    "node-name": file_name,
                    "filename": filename,
                    **self.file_options,
                },
            )
            done.append(file_name)
        if self.raw_options is None:
            return file_name
        raw_name = f"{prefix}-r"
        monitor.command(
            "blockdev-add",
            {"driver": "raw", "node-name": raw_name, "file": file_name, **self.raw_options},
        )
        done.append(raw_name)
        return raw_name


@dataclass(frozen=True)
class Reopen:
    """blockdev-reopen `parent` (a named node) with its `edge` child replaced."""

    parent: str
    edge: str
    old_child: str
    old_file: str
    parent_options: dict  # everything but the replaced edge, other children by reference
    child: NewChild


@dataclass(frozen=True)
class Mirror:
    """An auto-named raw root of a BlockBackend, swapped by a sync=none mirror."""

    source: str
    old_file: str
    child: NewChild


@dataclass(frozen=True)
class SwitchPlan:
    old: str
    new: str
    steps: tuple[Reopen | Mirror, ...]
    old_file_nodes: tuple[str, ...]
    prefix: str = field(default="corfs")


def _file_options(node: Node, extra: Mapping[str, object]) -> dict:
    return {**node.options, **extra}


def _parent_options(graph: Graph, parent: Node, edge: str, extra: Mapping[str, object]) -> dict:
    if parent.driver not in REOPENABLE:
        raise NoNodesOnPath(
            f"node {parent.name} ({parent.driver}) sits on the file; corfs can switch only "
            f"{', '.join(REOPENABLE)} parents"
        )
    if parent.filename.startswith("json:") and parent.driver == "raw":
        raise NoNodesOnPath(
            f"node {parent.name} has options QEMU 7.2 does not report "
            f"({parent.filename}); corfs cannot keep them across a reopen"
        )
    others = {k: v for k, v in graph.children.get(parent.name, {}).items() if k != edge}
    return {"driver": parent.driver, "node-name": parent.name, **parent.options, **extra, **others}


def _started_for(
    node: Node, started: Mapping[str | None, tuple[Mapping, Mapping]]
) -> tuple[Mapping, Mapping]:
    node_options, file_options = started.get(node.name) or (
        started.get(None) if _is_auto(node.name) else None
    ) or ({}, {})
    if file_options.get("aio") == "native" and not node.options.get("cache", {}).get("direct"):
        file_options = {k: v for k, v in file_options.items() if k != "aio"}  # QEMU refuses it
    return node_options, file_options


def _is_auto(name: str) -> bool:
    return name.startswith("#")  # QEMU's generated names; a user's must start with a letter


def _step_for(
    graph: Graph,
    file_node: Node,
    edge: Edge,
    node_options: Mapping[str, object],
    file_options: Mapping[str, object],
) -> Reopen | Mirror:
    fopts = _file_options(file_node, {**node_options, **file_options})
    if edge.parent_type != "block-driver":
        raise NoNodesOnPath(
            f"a {edge.parent_type} {edge.parent!r} uses node {file_node.name} "
            "directly; corfs switches only nodes under a format node"
        )
    parent = graph.nodes[edge.parent]
    if not _is_auto(parent.name):
        return Reopen(
            parent.name,
            edge.child_name,
            file_node.name,
            file_node.name,
            _parent_options(graph, parent, edge.child_name, node_options),
            NewChild(fopts, None),
        )
    # An auto-named parent refuses a reopen: replace it whole, in its own parent.
    if parent.driver != "raw":
        raise NoNodesOnPath(
            f"node {parent.name} ({parent.driver}) over {file_node.filename} "
            "has a generated name and cannot be reopened: give it a name "
            "(-drive ...,node-name=NAME, or -blockdev)"
        )
    ups = graph.parents.get(parent.name, [])
    raw_opts = {**parent.options, **node_options}
    if len(ups) == 1 and ups[0].parent_type == "block-backend":
        return Mirror(parent.name, file_node.name, NewChild(fopts, raw_opts))
    if len(ups) == 1 and ups[0].parent_type == "block-driver" and not _is_auto(ups[0].parent):
        grand = graph.nodes[ups[0].parent]
        return Reopen(
            grand.name,
            ups[0].child_name,
            parent.name,
            file_node.name,
            _parent_options(graph, grand, ups[0].child_name, node_options),
            NewChild(fopts, raw_opts),
        )
    raise NoNodesOnPath(
        f"node {parent.name} over {file_node.filename} has a generated name and "
        "its users cannot be reopened: give the drive a node-name"
    )


def plan_switch(
    monitor: Monitor,
    old: str,
    new: str,
    *,
    started: Mapping[str | None, tuple[Mapping, Mapping]] | None = None,
) -> SwitchPlan:
    """The steps that move every node on `old` to `new`. `started` maps an old file node's
    name (None: any auto-named one, i.e. a -drive's) to the options QEMU 7.2 does not report
    that it was started with: (for every node made or reopened over it, e.g. discard; for its
    new file node, e.g. aio). Only the caller can know them."""
    graph = read_graph(monitor)
    on_old = _file_nodes_on(graph, old)
    if not on_old:
        raise NoNodesOnPath(f"QEMU has no block node on {old}")
    steps = [
        _step_for(graph, node, edge, *_started_for(node, started or {}))
        for node in on_old
        for edge in graph.parents.get(node.name, [])
    ]
    if any(isinstance(s, Mirror) for s in steps) and len(steps) > 1:
        # A mirror's target refuses to share reads of its inode: with any other node on OLD
        # or NEW it fails, and undoing it would too.
        raise NoNodesOnPath(
            f"{old} is open by a node without a name of its own beside other nodes; corfs "
            "can switch that only alone: name it (-drive ...,node-name=NAME names only the "
            "drive's top node: a backing chain's nodes need -blockdev names)"
        )
    if any(isinstance(s, Reopen) for s in steps) and monitor.command("query-iothreads"):
        # QEMU 7.2 aborts (qemu_mutex_unlock_impl) when a node on an I/O thread gets a new
        # file node by blockdev-reopen, plain files too: the VM dies. Which drive runs on
        # which thread QMP does not tell; any I/O thread makes a reopen unsafe.
        raise NoNodesOnPath(
            f"QEMU runs I/O threads (-object iothread), and QEMU 7.2 aborts, killing the VM, "
            f"when a drive's file is replaced by blockdev-reopen on one: {old} is not handed "
            "over live; stop the VM and copy it out (corfs detach CACHE IMAGE DEST)"
        )
    prefix = "corfs"
    while any(name.startswith(prefix) for name in graph.nodes):
        prefix += "x"
    plan = SwitchPlan(old, new, tuple(steps), tuple(n.name for n in on_old), prefix)
    log.info("switch plan %s -> %s: %s", old, new, plan.steps)
    return plan


# ---- the switch ------------------------------------------------------------------------


def _reopen(monitor: Monitor, step: Reopen, child: str) -> None:
    monitor.command("blockdev-reopen", {"options": [{**step.parent_options, step.edge: child}]})


def _mirror_onto(
    monitor: Monitor, source: str, child: NewChild, filename: str, prefix: str, done: list[str]
) -> str:
    """Swap `source` for new nodes on `filename` built after `child`; return the new root."""
    writable = NewChild(
        {**child.file_options, "read-only": False},
        {**(child.raw_options or {}), "read-only": False},
    )
    target = writable.add(monitor, filename, prefix, done)
    _mirror(monitor, source, target, f"{prefix}-job")
    if child.file_options.get("read-only"):
        # A mirror needs a writable target. At completion QEMU reopens the raw node read-only
        # by itself; the file node under it is ours to reopen.
        options = {"driver": "file", "node-name": f"{prefix}-f", "filename": filename}
        monitor.command("blockdev-reopen", {"options": [{**options, **child.file_options}]})
    return target


def _mirror(monitor: Monitor, source: str, target: str, job: str) -> None:
    """Swap `source` for `target` under its BlockBackend; both hold the same bytes."""
    monitor.command(
        "blockdev-mirror",
        {"job-id": job, "device": source, "target": target, "sync": "none", "auto-dismiss": False},
    )
    _complete_mirror(monitor, job)


def _complete_mirror(monitor: Monitor, job: str) -> None:
    """Complete the sync=none mirror `job` (its target takes its source's place), unless it
    concluded already; QmpError if it cannot, the job cancelled. Dismissed either way."""
    try:
        if _job(monitor, job).get("status") != "concluded":
            _wait_job(monitor, job, "ready")
            monitor.command("block-job-complete", {"device": job})
            _wait_job(monitor, job, "concluded")
        error = _job(monitor, job).get("error")
        if error:
            raise QmpError(str(error))
    finally:
        _end_job(monitor, job)


_OUR_MIRROR = re.compile(r"corfsx*\d+-job")  # `_mirror`'s job ids (switch's prefixes)


def finish_cut_mirrors(monitor: Monitor) -> None:
    """A switch cut short during its sync=none mirror (the daemon killed between
    blockdev-mirror and block-job-complete) leaves the job running and the BlockBackend on
    OLD, with the job's target on NEW (hunt: the next mount took that node for QEMU switched
    and recorded the handoff finished). Complete it now: NEW holds the bytes; if QEMU cannot,
    cancel it and delete the nodes it was to switch to. A header job left over goes too."""
    end_header_job(monitor)
    for job in monitor.command("query-jobs"):
        name = job["id"]
        if job.get("type") != "mirror" or not _OUR_MIRROR.fullmatch(name):
            continue
        try:
            _complete_mirror(monitor, name)
            log.info("completed the mirror %s of a handoff cut short", name)
        except QmpError as e:
            log.warning("the mirror %s of a handoff cut short cannot complete (%s): "
                        "cancelled", name, e)
            _delete_added_nodes(monitor, name.removesuffix("-job"))  # its target, on NEW


def _job(monitor: Monitor, job: str) -> dict:
    jobs = monitor.command("query-jobs")
    return next((j for j in jobs if j["id"] == job), {})


def _wait_job(monitor: Monitor, job: str, status: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while (now := _job(monitor, job).get("status")) != status:
        if now == "concluded" or not now:
            raise QmpError(f"job {job} ended ({_job(monitor, job).get('error', 'cancelled')})")
        if time.monotonic() > deadline:
            raise QmpError(f"job {job} not {status} after {JOB_TIMEOUT:g} s")
        time.sleep(0.01)


def switch(monitor: Monitor, plan: SwitchPlan) -> None:
    """Carry out `plan`, all or nothing."""
    added: list[str] = []
    new_files: dict[str, str] = {}  # old file node -> its new one: parents that shared one still do
    undo: list[Reopen] = []  # in the order done
    deleted: list[str] = []
    step_name = "start"
    try:
        for i, step in enumerate(plan.steps):
            prefix = f"{plan.prefix}{i}"
            if isinstance(step, Reopen):
                step_name = f"add nodes on {plan.new}"
                child = step.child.add(
                    monitor, plan.new, prefix, added, new_files.get(step.old_file)
                )
                new_files.setdefault(step.old_file, f"{prefix}-f")
                step_name = f"blockdev-reopen {step.parent} with {step.edge}={child}"
                _reopen(monitor, step, child)
                undo.append(step)
            else:
                step_name = f"blockdev-mirror {step.source} onto nodes on {plan.new}"
                _mirror_onto(monitor, step.source, step.child, plan.new, prefix, added)
                # alone in its plan (see plan_switch): nothing after it can fail
            log.info("switched: %s", step_name)
        left = {n.name for n in read_graph(monitor).nodes.values()}
        for name in plan.old_file_nodes:
            if name in left:  # -blockdev nodes are the monitor's to delete; implicit ones went
                step_name = f"blockdev-del {name}"
                monitor.command("blockdev-del", {"node-name": name})
                deleted.append(name)
    except QmpError as e:
        log.warning("switch %s -> %s failed at %s: %s; undoing", plan.old, plan.new, step_name, e)
        _undo(monitor, plan, undo, added, deleted)
        raise SwitchFailed(f"{step_name}: {e}") from None


def _undo(
    monitor: Monitor, plan: SwitchPlan, undo: list[Reopen], added: list[str], deleted: list[str]
) -> None:
    """Put QEMU back on OLD; log (never raise) what cannot be undone."""
    for name in deleted:  # back under its own name, for the reopens below to find
        options = next(s.child.file_options for s in undo if s.old_file == name)
        node = {"driver": "file", "node-name": name, "filename": plan.old, **options}
        try:
            monitor.command("blockdev-add", node)
        except QmpError as e:
            log.error("cannot add node %s back on %s: %s", name, plan.old, e)
    for i, step in reversed(list(enumerate(undo))):
        try:
            old_child = step.old_child
            if old_child not in read_graph(monitor).nodes:  # an implicit node the reopen freed
                old_child = step.child.add(monitor, plan.old, f"{plan.prefix}u{i}", [])
            _reopen(monitor, step, old_child)
        except QmpError as e:
            log.error("undo of the reopen of %s on %s failed: %s", step.parent, plan.old, e)
    existing = read_graph(monitor).nodes
    for name in reversed(added):
        if name in existing:
            try:
                monitor.command("blockdev-del", {"node-name": name})
            except QmpError as e:
                log.error("cannot delete node %s after a failed switch: %s", name, e)

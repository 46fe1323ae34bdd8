"""The lifecycle of every command that loads the driver, written once.

::

    lock -> NotReady -> body -> [unload ours, load the tree] -> daemons, driver root, state -> Ready
         -> wait for a stop signal (TERM, INT, HUP, QUIT, PIPE) -> shutdown

- **lock**: the pid file, flocked before it is truncated; a second instance
  aborts with the reference's message and touches nothing (not even the
  readiness file: the first instance's ``Ready`` stays).
- **NotReady**: written right after the lock, before any other work, so a
  stale ``Ready`` of a killed pod never outlives the start of its successor.
- **body**: the command's own work (the hand-off, a build, the userspace
  install); it returns the :class:`ModuleTree` to load, or None when the
  loaded driver already is this configuration (the fast path).
- **load**: whatever NVIDIA driver is loaded is stopped and unloaded (never
  forced), then the tree is loaded (``driver_load``).
- **publish**: the loaded tree goes in the driver root's ``/lib/modules`` for the nvidia-peermem
  sidecar's chroot modprobe; on the fast path with RDMA, the loaded driver's tree is looked up
  (``module_trees.loaded_tree``), since a restarted container has lost it.
- **serve**: daemons, NVIDIA's sources for the GDS/GDRCopy sidecars, the driver root, the state file,
  ``Ready``.
- **a failure (or a signal) before the wait undoes what was done**: once the
  node was touched (load or serve began), our daemons are stopped, the NVIDIA
  modules unloaded and the driver root unmounted; in every case the state and
  readiness files are removed and the lock released. A failure before any
  node change leaves the node's driver as it was.
- **shutdown** after the wait: the same undo; while the driver is in use it
  says so once and keeps running (reference semantics).
"""

from __future__ import annotations

from typing import Callable, Optional

from .module_trees import ModuleTree, loaded_tree
from .node.daemons import start_daemons, stop_daemons
from .node.driver_load import Loader
from .node.state import (
    PidLock,
    clear_daemons_status,
    expose_driver_sources,
    mount_rootfs,
    publish_modules,
    remove_state,
    set_daemons_status,
    unmount_rootfs,
    withdraw_modules,
    write_state,
)
from .node.unload import DriverInUse, unload
from .toolkit.errors import Cancelled, DriverCtrError
from .toolkit.log import Logger, get_logger
from .toolkit.settings import Settings
from .toolkit.waiting import Cancellation
from .tools import Tools

Body = Callable[["Service"], Optional[ModuleTree]]


class Service:
    """Hold the node for the life of the container."""

    def __init__(self, settings: Settings, cancel: Cancellation, tools: Tools) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.cancel = cancel
        self.tools = tools
        self.runner = tools.runner.with_cancel(cancel)  # start-up work: stops on a TERM
        self.undo_runner = tools.runner.with_cancel(None)  # undo work: runs after it
        self.log: Logger = get_logger()
        self.lock: Optional[PidLock] = None
        self.touched = False  # the node's driver state was changed by us
        self.published: Optional[ModuleTree] = None  # the tree linked into the driver root

    def run(self, body: Body) -> int:
        """The whole lifecycle (see the module docstring); the exit status."""
        self.lock = PidLock(self.paths.pid_file).acquire()
        set_daemons_status(self.paths, "NotReady")
        try:
            tree = body(self)
            self.touched = True
            if tree is not None:
                self.unload_ours()
                report = Loader(self.settings, self.runner).load_tree(tree)
                self.log.info(
                    "NVIDIA modules loaded",
                    source=tree.source,
                    modules=report.loaded,
                    not_loaded=report.failed,
                    params=report.params,
                    firmware=report.firmware,
                )
                self.publish(tree)
            elif self.settings.gpu_direct_rdma_enabled:
                self.publish_loaded()
            self.serve()
        except Cancelled as exc:
            self.log.info("stopping before the driver was ready", reason=str(exc))
            self.undo()
            return 0
        except BaseException:
            try:
                self.undo()
            except Exception as exc:  # noqa: BLE001 - the failure that started the undo is the one reported
                self.log.warning("cleanup after the failure was incomplete", reason=str(exc))
            raise
        return self.wait_for_signal()

    def publish(self, tree: ModuleTree) -> None:
        """Put the loaded tree in the driver root's ``/lib/modules`` (``node.state.publish_modules``) for a
        chroot modprobe (the nvidia-peermem sidecar); the GPU driver is loaded: never undone for this."""
        try:
            publish_modules(self.paths, tree.root, tree.kernel, self.runner, self.log)
            self.published = tree
        except (OSError, DriverCtrError) as exc:  # a link in the tree, a full disk: the driver stays
            self.not_published(str(exc))

    def publish_loaded(self) -> None:
        """The fast path with RDMA: this container is new, its ``/lib/modules`` lacks the loaded tree."""
        found = loaded_tree(self.settings, self.cancel, self.tools)
        if isinstance(found, ModuleTree):
            self.log.info("the loaded driver's tree found", source=found.source, tree=str(found.root))
            self.publish(found)
        else:
            self.not_published(found.reason)

    def not_published(self, reason: str) -> None:
        self.log.warning(
            "could not put the loaded tree in the driver root's /lib/modules: a chroot modprobe "
            "(the nvidia-peermem sidecar) will not find the modules",
            reason=reason,
        )

    def unload_ours(self) -> None:
        """Stop the daemons (they hold the devices), unload the NVIDIA modules, unmount the driver root."""
        stop_daemons(self.paths, self.log)
        unload(self.paths, self.undo_runner, self.log)
        unmount_rootfs(self.paths, self.undo_runner, self.log)
        if self.published is not None:
            withdraw_modules(self.paths, self.published.root, self.published.kernel)
            self.published = None

    def serve(self) -> None:
        """After a load (or the fast path): daemons, driver root, state, Ready."""
        start_daemons(self.settings, self.runner, self.log, self.cancel)
        expose_driver_sources(self.settings, self.runner, self.log)  # before the root is mounted: sidecars wait
        mount_rootfs(self.paths, self.runner, self.log)
        if self.settings.driver_config_digest:
            write_state(self.paths, self.settings.driver_config_digest)
        set_daemons_status(self.paths, "Ready")
        self.log.info("driver ready: waiting for a signal")

    def wait_for_signal(self) -> int:
        """Block until a stop signal; then shut down. While the driver is in use,
        say so once and keep running (reference semantics): nothing is taken back."""
        told = False
        while True:
            while not self.cancel.cancelled:
                self.cancel.sleep(0.5)
            self.log.info("caught signal", signal=self.cancel.signal_name)
            try:
                if self.touched:
                    self.unload_ours()
            except DriverInUse as exc:
                if not told:
                    self.log.warning("driver in use: not unloading, keeping the container running", reason=str(exc))
                    told = True
                self.cancel.clear()
                continue
            self.undo(unloaded=True)
            return 0

    def undo(self, unloaded: bool = False) -> None:
        """Take back what was done: the driver when the node was touched (unless ``unloaded`` already), then
        the readiness and the lock. The state file goes only with the driver it describes: when no driver
        of ours was unloaded (a failure before any load, the fast path), the loaded driver stays and so does
        its state, which k8s-driver-manager compares with the digest (deleting it would evict every GPU
        workload of the node at the next restart). Every step runs whatever an earlier one raised; the
        first error is raised once the last step has run, the others are logged."""
        first: Optional[BaseException] = None

        def attempt(what: str, step: Callable[[], None]) -> bool:
            nonlocal first
            try:
                step()
                return True
            except Exception as exc:  # noqa: BLE001 - the later steps run whatever this one raised
                if first is None:
                    first = exc
                else:
                    self.log.warning("cleanup step failed", step=what, reason=str(exc))
                return False

        if self.touched and not unloaded:
            unloaded = attempt("unload the driver", self.unload_ours)
        if unloaded:
            attempt("remove the state file", lambda: remove_state(self.paths))
        attempt("remove the readiness file", lambda: clear_daemons_status(self.paths))
        attempt("release the lock", self._release_lock)
        if first is not None:
            raise first
        if self.touched:
            self.log.info("shut down: no NVIDIA module left loaded, driver root unmounted, pid and state removed")

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release(remove=True)

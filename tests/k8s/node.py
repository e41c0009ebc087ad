"""A real single-node Kubernetes for tests: the control plane of ``controlplane.py`` plus
containerd, runc, a CNI bridge, kubelet, kube-scheduler and kube-proxy, so the chart's
pods really start from genq's images (``build-images.sh``).

The host is shared, so the node is careful with it (``../../../shared/notes/real-node.md``
has the measurements behind each choice):

- One node per machine, behind a lock: the bridge, the KUBE-* chains and the cgroup root
  are host-global.
- Everything the node adds to the host is named so it can be found again: the bridge
  ``genqbr0`` (its address is the node's IP, so pods, the apiserver and the test's
  nats-server and S3 server talk over a link this module made, never over the host's
  interfaces), the cgroup root ``/genq-node``, state under ``/run/genq-node``, work files
  under ``/var/tmp/genq-node``. :func:`sweep` removes all of it; it runs at teardown and
  before every start (repairing a crashed run).
- Pods cannot reach past the bridge: a FORWARD rule drops what they send elsewhere, and
  the Service range is routed to the bridge, so a stale ClusterIP never leaves the host.
- The sysctls the kubelet and the bridge change are put back; :func:`host_snapshot`
  lets a test prove the host is as it was.

Use the ``node`` fixture (session-scoped; tests carry the ``node`` marker). Neighbours:
``controlplane.py`` (etcd, apiserver, controller manager), ``build-bins.sh`` (the
binaries), ``build-images.sh`` (the images), ``tests/test_node.py`` (what it proves).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import stop_process
from k8s import controlplane

HERE = Path(__file__).resolve().parent
NAME = "genq-node"
BRIDGE = "genqbr0"
POD_CIDR = "10.244.0.0/24"
#: The bridge's address: the node's InternalIP, where the apiserver, the kubelet and the
#: tests' servers for pods (nats-server, S3) listen.
NODE_IP = "10.244.0.1"
STATE = Path("/run") / NAME
WORK = Path("/var/tmp") / NAME
CACHE = Path(os.environ.get("GENQ_NODE_CACHE", Path.home() / ".cache" / NAME))
#: containerd's root is kept between runs, so imported images stay imported.
CONTAINERD_ROOT = CACHE / "containerd"
SOCKET = STATE / "containerd.sock"
LOCK = Path("/run/lock") / f"{NAME}.lock"
CGROUP_ROOT = NAME
CGROUPS = Path("/sys/fs/cgroup")
#: The sysctls the kubelet (protectKernelDefaults off) and the bridge set: restored.
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward",
           "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables", "net.ipv4.conf.all.route_localnet")
#: The Debian packages the node needs (installed by .ci/run).
PACKAGES = {"containerd": "containerd", "runc": "runc", "ctr": "containerd", "iptables": "iptables",
            "conntrack": "conntrack", "buildah": "buildah", "debootstrap": "debootstrap"}
CNI_BIN = Path("/usr/lib/cni")
NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy", "pause")
READY_TIMEOUT = 120.0
#: Host paths the kubelet, containerd and CNI write to whatever their configuration says;
#: removed at sweep when nothing but ours is in them.
HARDCODED = (Path("/run/containerd/s"), Path("/run/containerd/fifo"), Path("/run/containerd/runc"), Path("/run/containerd"),
             Path("/var/lib/kubelet/device-plugins"), Path("/var/lib/kubelet/pods"), Path("/var/lib/kubelet"),
             Path("/var/lib/cni/results"), Path("/var/lib/cni/networks"), Path("/var/lib/cni"),
             Path("/var/log/containers"), Path("/var/log/pods"), Path("/run/netns"))


def run(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(args)} exited with {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the node: root, Debian packages, CNI plugins,
    cgroup v1 hierarchies or the built binaries."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for exe, pkg in PACKAGES.items():
        if shutil.which(exe) is None:
            missing.append(f"{exe} (apt-get install {pkg})")
    if not (CNI_BIN / "bridge").exists():
        missing.append("CNI plugins (apt-get install containernetworking-plugins)")
    folder = controlplane.bin_dir()
    if folder is None or not all(os.access(folder / b, os.X_OK) for b in NODE_BINARIES):
        missing.append("kubelet/kube-scheduler/kube-proxy/pause (tests/k8s/build-bins.sh)")
    return missing


# -- the host: snapshot, sysctls, sweep ---------------------------------------------------------


def host_snapshot() -> dict[str, object]:
    """What the node may touch on the host, in a comparable form: firewall rules, links,
    addresses, routes, mounts, cgroups, network namespaces, sysctls, host paths."""
    def lines(*cmd: str) -> list[str]:
        r = run(*cmd, check=False)
        return sorted(l for l in r.stdout.splitlines() if l and not l.startswith("#") and not l.startswith(":"))

    mounts = sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    cgroups = sorted(str(p) for h in _hierarchies(include_unified=True) for p in h.iterdir() if p.is_dir())
    return {
        "iptables": _strip_counters(lines("iptables-save")),
        "ip6tables": _strip_counters(lines("ip6tables-save")),
        "nft tables": lines("nft", "list", "tables"),
        "links": sorted(re.sub(r"^\d+: ", "", l).split("@")[0].split(":")[0] for l in lines("ip", "-o", "link")),
        "addresses": lines("ip", "-o", "addr"),
        "routes": lines("ip", "route", "show", "table", "all"),
        "mounts": mounts,
        "cgroups": cgroups,
        "netns": sorted(os.listdir("/run/netns")) if Path("/run/netns").exists() else [],
        "sysctls": {k: _sysctl(k) for k in SYSCTLS},
        "paths": sorted(str(p) for p in HARDCODED if p.exists()),
    }


def _strip_counters(rules: list[str]) -> list[str]:
    return [re.sub(r"^\[\d+:\d+\] ", "", r) for r in rules]


def _sysctl(key: str) -> str | None:
    path = Path("/proc/sys") / key.replace(".", "/")
    return path.read_text().strip() if path.exists() else None


def _set_sysctl(key: str, value: str | None) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    if value is not None and path.exists() and path.read_text().strip() != value:
        path.write_text(value)


def _hierarchies(include_unified: bool = False) -> list[Path]:
    """The cgroup v1 hierarchies (one folder each), and cgroup2's when asked."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, mountpoint = fields[sep + 1], Path(fields[4])
        if fstype == "cgroup" or (include_unified and fstype == "cgroup2"):
            if mountpoint.parent == CGROUPS or mountpoint == CGROUPS:
                out.append(mountpoint)
    return sorted(set(out))


#: What the host had before the node first changed it: sysctl values, nftables tables,
#: the fixed host paths. Written once and kept across a crash, so the next sweep restores
#: the host's values and never takes a crashed run's for them.
BEFORE = CACHE / "host-before.json"


def _nft_tables() -> list[str]:
    return sorted(" ".join(l.split()[1:3]) for l in run("nft", "list", "tables", check=False).stdout.splitlines() if l.strip())


def remember_host() -> None:
    if not BEFORE.exists():
        BEFORE.parent.mkdir(parents=True, exist_ok=True)
        BEFORE.write_text(json.dumps({"sysctls": {k: _sysctl(k) for k in SYSCTLS}, "nft_tables": _nft_tables(),
                                      "paths": [str(p) for p in HARDCODED if p.exists()]}))


def restore_host(*, forget: bool = False) -> None:
    """Put back the sysctls; drop the nftables tables and host folders that did not exist
    before the node and are empty now (iptables-nft makes a table on first use)."""
    if not BEFORE.exists():
        return
    before = json.loads(BEFORE.read_text())
    for key, value in before["sysctls"].items():
        _set_sysctl(key, value)
    if forget:
        for table in set(_nft_tables()) - set(before["nft_tables"]):
            family, name = table.split()
            listing = json.loads(run("nft", "-j", "list", "table", family, name, check=False).stdout or "{}")
            if not any("rule" in item for item in listing.get("nftables", [])):
                run("nft", "delete", "table", family, name, check=False)
        for path in HARDCODED:  # deepest first in the tuple's order
            if str(path) not in before["paths"]:
                try:
                    path.rmdir()
                except OSError:
                    pass
        BEFORE.unlink()


def sweep() -> None:
    """Remove whatever a node left on the host, running or crashed: processes, mounts,
    network namespaces, the bridge, firewall chains, cgroups, conntrack entries, state
    files and host paths, and restore the sysctls. Idempotent."""
    # Processes: anything started from our binaries or with our socket/paths.
    for pid, cmdline in _processes():
        if str(SOCKET) in cmdline or str(STATE) in cmdline or str(WORK) in cmdline:
            _kill(pid)
    # Mounts under our folders (deepest first), and the netns containerd made for pods.
    for mountpoint in sorted(_mounts_under(STATE, WORK, CONTAINERD_ROOT, Path("/run/netns")), key=len, reverse=True):
        run("umount", "-l", mountpoint, check=False)
    if Path("/run/netns").exists():
        for ns in Path("/run/netns").iterdir():
            if ns.name.startswith("cni-"):
                ns.unlink(missing_ok=True)
    # Network: the bridge (its veths go with the namespaces), firewall rules and chains.
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        # A pod whose CNI DEL never ran (killed with the node) leaves its host-side veth.
        for line in run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout.splitlines():
            run("ip", "link", "delete", line.split(":")[1].strip().split("@")[0], check=False)
        run("ip", "link", "delete", BRIDGE, check=False)
    for family in ("iptables", "ip6tables"):
        _sweep_chains(family)
    for family in ("ip", "ip6"):
        if run("nft", "list", "table", family, "kube-proxy", check=False).returncode == 0:
            run("nft", "delete", "table", family, "kube-proxy", check=False)
    for cidr in (POD_CIDR, controlplane.SERVICE_CIDR):
        for flag in ("-s", "-d", "--reply-src", "--reply-dst"):
            run("conntrack", "-D", flag, cidr, check=False)
    # cgroups: depth first, in every hierarchy.
    for hierarchy in _hierarchies(include_unified=True):
        root = hierarchy / CGROUP_ROOT
        if root.exists():
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                _rmdir_cgroup(folder)
            _rmdir_cgroup(root)
    # Files: our state and work folders, and what the parts write to fixed host paths.
    shutil.rmtree(STATE, ignore_errors=True)
    shutil.rmtree(WORK, ignore_errors=True)
    _sweep_hardcoded()
    restore_host(forget=True)


def _processes() -> Iterator[tuple[int, str]]:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            yield int(entry.name), cmdline


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)


def _mounts_under(*folders: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if any(point == str(f) or point.startswith(f"{f}/") for f in folders):
            points.append(point)
    return points


def _sweep_chains(family: str) -> None:
    """Delete the jumps into KUBE-*/CNI-* chains and the rules marked ``genq-node``, then
    the chains themselves, table by table."""
    save = run(f"{family}-save", check=False).stdout
    table = None
    ours: dict[str, set[str]] = {}
    deletes: list[tuple[str, str]] = []
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
            ours.setdefault(table, set())
        elif line.startswith(":") and table:
            chain = line[1:].split()[0]
            if chain.startswith(("KUBE-", "CNI-")):
                ours[table].add(chain)
        elif line.startswith("-A ") and table:
            chain = line.split()[1]
            if chain.startswith(("KUBE-", "CNI-")):
                continue  # goes with its chain
            if re.search(r"-j (KUBE-|CNI-)", line) or NAME in line:
                deletes.append((table, line))
    for table, rule in deletes:
        run(family, "-t", table, "-D", *_split_rule(rule[3:]), check=False)
    for table, chains in ours.items():
        for chain in chains:
            run(family, "-t", table, "-F", chain, check=False)
        for chain in chains:
            run(family, "-t", table, "-X", chain, check=False)


def _split_rule(rule: str) -> list[str]:
    import shlex

    return shlex.split(rule)


def _rmdir_cgroup(folder: Path) -> None:
    for _ in range(50):
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # A process still in it: move every task to the parent, then try again.
            for tasks in ("cgroup.procs", "tasks"):
                try:
                    pids = (folder / tasks).read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        (folder.parent / tasks).write_text(pid)
                    except OSError:
                        _kill(int(pid))
            time.sleep(0.1)


def _sweep_hardcoded() -> None:
    logs = Path("/var/log/containers")
    if logs.exists():
        for link in logs.iterdir():
            if link.is_symlink() and str(WORK) in os.readlink(link):
                link.unlink()
    results = Path("/var/lib/cni/results")
    if results.exists():
        for f in results.iterdir():
            if f.name.startswith(NAME):
                f.unlink()
    shutil.rmtree(Path("/var/lib/cni/networks") / NAME, ignore_errors=True)
    # The device-plugin registration socket: kubelet's path is fixed, whatever --root-dir.
    plugins = Path("/var/lib/kubelet/device-plugins")
    if plugins.exists():
        for f in plugins.iterdir():
            if f.name in ("kubelet.sock", "kubelet_internal_checkpoint", "DEPRECATION") and not f.is_dir():
                f.unlink()


# -- the node ---------------------------------------------------------------------------------


@dataclass
class Node:
    """A running node: its control plane, its processes, and helpers the tests use."""

    cp: controlplane.ControlPlane
    bin: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # name -> ref, from build-images.sh

    ip: str = NODE_IP

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return self.cp.kubectl(*args, check=check, input=input)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run("ctr", "--address", str(SOCKET), "-n", "k8s.io", *args, check=check, timeout=timeout)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = WORK / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def pod_logs(self, namespace: str) -> str:
        """Every container's log in ``namespace`` (for a failing test's message)."""
        out = []
        pods = json.loads(self.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        for pod in pods:
            name = pod["metadata"]["name"]
            out.append(f"--- pod {name}: {pod['status'].get('phase')} {json.dumps(pod['status'].get('containerStatuses', []))[:800]}")
            for c in pod["spec"]["containers"]:
                r = self.kubectl("logs", "-n", namespace, name, "-c", c["name"], "--tail=30", check=False)
                out.append(r.stdout + r.stderr)
        return "\n".join(out)

    # lifecycle

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(WORK / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        """Teardown in the order that leaves nothing behind: no new pods, every pod gone
        (CNI DEL runs for each), no tasks; then the node's processes; then the sweep."""
        try:
            if self.cp is not None:
                self.cp.stop_process("kube-controller-manager")
            stop_process(self.processes.pop("kube-scheduler", None))
            if self.cp is not None and "kubelet" in self.processes and self.processes["kubelet"].poll() is None:
                self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false", check=False)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    pods = self.kubectl("get", "pods", "-A", "-o", "name", check=False).stdout.split()
                    tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
                    if not pods and not tasks:
                        break
                    time.sleep(0.5)
            stop_process(self.processes.pop("kube-proxy", None))
            run(str(self.bin / "kube-proxy"), "--cleanup", "--proxy-mode=iptables", check=False)
            stop_process(self.processes.pop("kubelet", None))
            if self.cp is not None:
                self.cp.stop()
            stop_process(self.processes.pop("containerd", None))
        finally:
            self.processes.clear()
            sweep()


def build_images() -> dict[str, tuple[str, Path]]:
    """Run build-images.sh (a no-op when nothing changed): name -> (ref, OCI archive)."""
    out = run(str(HERE / "build-images.sh"), timeout=3600).stdout
    images = {}
    for line in out.splitlines():
        name, ref, archive = line.split()
        images[name] = (ref, Path(archive))
    return images


def start(images: dict[str, tuple[str, Path]]) -> Node:
    """Bring the node up (≈5 s warm) and return it; on any failure stop what started."""
    folder = controlplane.bin_dir()
    assert folder is not None
    sweep()
    remember_host()
    for d in (STATE, WORK, CONTAINERD_ROOT):
        d.mkdir(parents=True, exist_ok=True)
    node = Node(cp=None, bin=folder)  # type: ignore[arg-type]
    atexit.register(node.stop)
    try:
        _network()
        _cgroup_root()
        _containerd(node, images["pause"][0])
        _import_images(node, images)
        node.images = {name: ref for name, (ref, _) in images.items()}
        node.cp = controlplane.start(folder, WORK / "control-plane", node_ip=NODE_IP)
        _scheduler(node)
        _proxy(node)
        _kubelet(node)
        _wait_node_ready(node)
        restore_host()  # kubelet set panic-on-oops & co. at start
        _set_sysctl("net.ipv4.ip_forward", "1")  # pod -> Service -> pod is routed
    except BaseException:
        node.stop()
        raise
    return node


def _network() -> None:
    """The bridge with the node's address, the Service range routed to it, and the rule
    that keeps pods' packets from leaving through the host's interfaces."""
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    run("ip", "route", "add", controlplane.SERVICE_CIDR, "dev", BRIDGE)
    run("iptables", "-I", "FORWARD", "1", "-i", BRIDGE, "!", "-o", BRIDGE,
        "-m", "comment", "--comment", NAME, "-j", "DROP")
    _set_sysctl("net.ipv4.ip_forward", "1")
    cni = WORK / "cni"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-genq-node.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": NAME,
        "plugins": [{
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(STATE / "cni-ipam")},
        }],
    }))


def _cgroup_root() -> None:
    """kubelet on cgroup v1 needs its cgroupRoot in every hierarchy beforehand; a new
    cpuset is empty until its cpus and mems are copied from the parent."""
    for hierarchy in _hierarchies():
        root = hierarchy / CGROUP_ROOT
        root.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            for f in ("cpuset.cpus", "cpuset.mems"):
                (root / f).write_text((hierarchy / f).read_text())


def _containerd(node: Node, pause: str) -> None:
    config = WORK / "containerd.toml"
    config.write_text(f"""version = 2
root = "{CONTAINERD_ROOT}"
state = "{STATE / 'containerd'}"
[grpc]
  address = "{SOCKET}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This VM refuses a negative oom_score_adj even for root (runc fails every sandbox).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{STATE / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{WORK / 'cni'}"
""")
    node._spawn("containerd", ["containerd", "--config", str(config)])
    deadline = time.monotonic() + 60
    while node.ctr("version", check=False).returncode:
        if node.processes["containerd"].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"containerd did not start:\n{node.log_tail('containerd')}")
        time.sleep(0.2)


def _import_images(node: Node, images: dict[str, tuple[str, Path]]) -> None:
    """Import each image containerd lacks (its root is kept: usually none)."""
    present = set(node.ctr("images", "ls", "-q").stdout.split())
    for ref, archive in images.values():
        if ref not in present:
            node.ctr("images", "import", str(archive), timeout=600)
            node.ctr("images", "label", ref, "io.cri-containerd.pinned=pinned")


def _scheduler(node: Node) -> None:
    port = controlplane.free_port()
    kubeconfig = str(node.cp.kubeconfig)
    node._spawn("kube-scheduler", [str(node.bin / "kube-scheduler"), f"--kubeconfig={kubeconfig}", "--leader-elect=false",
                                   "--bind-address=127.0.0.1", f"--secure-port={port}",
                                   f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}"])


def _proxy(node: Node) -> None:
    health, metrics = controlplane.free_port(), controlplane.free_port()
    node._spawn("kube-proxy", [
        str(node.bin / "kube-proxy"), f"--kubeconfig={node.cp.kubeconfig}", f"--hostname-override={NAME}",
        f"--cluster-cidr={POD_CIDR}", "--proxy-mode=iptables",
        f"--healthz-bind-address=127.0.0.1:{health}", f"--metrics-bind-address=127.0.0.1:{metrics}",
        # Leave the host's sysctls alone: no localhost NodePorts, no conntrack tuning.
        "--iptables-localhost-nodeports=false", "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0s", "--conntrack-tcp-timeout-close-wait=0s",
    ])


def _kubelet(node: Node) -> None:
    port, health = controlplane.free_port(), controlplane.free_port()
    config = WORK / "kubelet.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{SOCKET}",
        "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
        "failSwapOn": False, "failCgroupV1": False,
        "address": NODE_IP, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": health,
        # kubectl logs/exec/port-forward without kubelet client certificates (this
        # isolated test machine only).
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        # No cluster DNS and no lookups past the bridge: pods use IPs.
        "resolvConf": "",
        "makeIPTablesUtilChains": False,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        # Never collect the imported images (nothing can pull them again).
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "5s",
        "podLogsDir": str(WORK / "pod-logs"),
        "serializeImagePulls": False,
    }))
    node._spawn("kubelet", [
        str(node.bin / "kubelet"), f"--config={config}", f"--kubeconfig={node.cp.kubeconfig}",
        f"--root-dir={WORK / 'kubelet'}", f"--cert-dir={WORK / 'kubelet-pki'}",
        f"--hostname-override={NAME}", f"--node-ip={NODE_IP}",
    ])


def _wait_node_ready(node: Node) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        for name, proc in node.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{node.log_tail(name)}")
        r = node.kubectl("get", "node", NAME, "-o", "json", check=False)
        if r.returncode == 0:
            conditions = {c["type"]: c for c in json.loads(r.stdout)["status"].get("conditions", [])}
            ready = conditions.get("Ready", {})
            if ready.get("status") == "True":
                return
            last = json.dumps(ready)
        time.sleep(0.3)
    raise RuntimeError(f"node not Ready after {READY_TIMEOUT:.0f} s ({last}):\n{node.log_tail('kubelet')}")


def require_prerequisites() -> None:
    """Skip when the machine lacks a prerequisite, unless ``GENQ_K8S_REQUIRED=1`` (CI):
    then fail."""
    missing = missing_prerequisites()
    if missing:
        reason = "the real node needs: " + ", ".join(missing)
        if os.environ.get("GENQ_K8S_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


class HostChanged(AssertionError):
    pass


def diff_snapshots(before: dict, after: dict) -> dict[str, tuple]:
    """The parts of two :func:`host_snapshot` results that differ: {part: (gone, new)}."""
    out = {}
    for part in before:
        b, a = before[part], after[part]
        if b != a:
            if isinstance(b, list):
                out[part] = (sorted(set(b) - set(a)), sorted(set(a) - set(b)))
            else:
                out[part] = (b, a)
    return out


@contextlib.contextmanager
def running_node(*, blocking: bool = True) -> Iterator[Node]:
    """One node, under the machine's lock; after teardown the host must be as before
    (else :class:`HostChanged`)."""
    images = build_images()
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        sweep()  # a crashed run's leftovers are not the host's state
        before = host_snapshot()
        n = start(images)
        try:
            yield n
        finally:
            n.stop()
            changed = diff_snapshots(before, host_snapshot())
            if changed:
                raise HostChanged(f"the node left the host changed: {changed}")


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    """A running single-node cluster with genq's images imported (see running_node)."""
    require_prerequisites()
    with running_node() as n:
        yield n


def wait_for(check, timeout: float = 120, interval: float = 0.5, what: str = ""):
    """Poll ``check()`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or check}")
        time.sleep(interval)


def http(url: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, **kw)

"""A real Kubernetes control plane for tests: etcd, kube-apiserver and (optionally)
kube-controller-manager, run as local processes on 127.0.0.1 with free ports.

The binaries are built from the Go module beside this file by ``build-bins.sh`` and
cached outside the clone; there is no Docker here, so no kind. The flags follow
controller-runtime's envtest: secure serving only, a generated CA, client-certificate
authentication, RBAC authorization, service-account signing keys, and the ServiceAccount
admission plugin off (no pod needs a token: there are no nodes). The controller manager
makes Deployments, ReplicaSets, namespaces and garbage collection (ownerReferences)
behave as in a cluster; no scheduler or kubelet runs, so pods stay Pending.

Use the ``control_plane`` fixture (session-scoped; import it into a test module or list
this module in ``pytest_plugins``), or :func:`start` directly. Everything started is
stopped by PID, SIGTERM first. Neighbours: ``build-bins.sh`` (the binaries),
``../../crds`` (applied at start), ``tests/test_k8s_control_plane.py`` (what it proves).
"""

from __future__ import annotations

import atexit
import base64
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CRDS = REPO / "crds"
BUILD_SCRIPT = HERE / "build-bins.sh"

#: The apiserver's Service range; envtest's. Its first address is the ``kubernetes``
#: Service's, so it is in the serving certificate.
SERVICE_CIDR = "10.0.0.0/24"
#: Seconds each process may take to become healthy. kube-apiserver takes 2-3 s on 2
#: idle cores (every built-in API and the RBAC bootstrap come before /readyz); a loaded CI
#: machine can take many times that.
START_TIMEOUT = 90.0
#: Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0
#: The user the tests and the kubeconfig act as; system:masters bypasses RBAC.
ADMIN_USER, ADMIN_GROUP = "genq-test-admin", "system:masters"


def bin_dir() -> Path | None:
    """Folder holding the built binaries, or None when they are not built.

    ``GENQ_K8S_BIN`` overrides; otherwise ``build-bins.sh --print-dir`` names the cached
    folder for the current go.mod (it needs ``go`` on PATH, to key on the Go version).
    """
    names = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
    env = os.environ.get("GENQ_K8S_BIN")
    if env:
        folder = Path(env)
    else:
        if shutil.which(os.environ.get("GO", "go")) is None:
            return None
        try:
            out = subprocess.run([str(BUILD_SCRIPT), "--print-dir"], check=True, capture_output=True, text=True, timeout=60)
        except (subprocess.SubprocessError, OSError):
            return None
        folder = Path(out.stdout.strip().splitlines()[-1])
    return folder if all(os.access(folder / n, os.X_OK) for n in names) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- certificates -------------------------------------------------------------------


@dataclass
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        crt.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key.chmod(0o600)
        return crt, key


def _issue(subject: x509.Name, issuer: _Issued | None, *, ca: bool = False, sans: Sequence[x509.GeneralName] = (), usage=None) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return _Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def _name(cn: str, *groups: str) -> x509.Name:
    """A certificate subject as the apiserver reads it: CN is the user, each O a group."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups)])


# -- processes ------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running control plane: where it listens, how to authenticate, its processes."""

    workdir: Path
    bin: Path
    server: str
    ca_file: Path
    client_cert: Path
    client_key: Path
    kubeconfig: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _ca: _Issued | None = field(default=None, repr=False)
    _specs: dict[str, tuple[list[str], str]] = field(default_factory=dict, repr=False)

    # identities and clients

    def add_user(self, name: str, groups: Sequence[str] = ()) -> Path:
        """A client certificate for user ``name`` in ``groups``, for testing RBAC (the
        admin is in system:masters, which RBAC never checks). Returns its kubeconfig; the
        certificate and key are beside it as <name>.crt / <name>.key."""
        crt, key = _issue(_name(name, *groups), self._ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH).write(self.workdir / "pki", name)
        path = self.workdir / f"kubeconfig-{name}"
        path.write_text(yaml.safe_dump(_kubeconfig(self.server, self.ca_file, crt, key, name)))
        path.chmod(0o600)
        return path

    def service_account_kubeconfig(self, namespace: str, name: str, hours: int = 2) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` with a
        token from the TokenRequest API, as a pod of that account would."""
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={hours}h").stdout.strip()
        path = self.workdir / f"kubeconfig-sa-{namespace}-{name}"
        config = _kubeconfig(self.server, self.ca_file, self.client_cert, self.client_key, f"{namespace}-{name}")
        config["users"][0]["user"] = {"token": token}
        config["contexts"][0]["context"]["namespace"] = namespace
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def ssl_context(self, user: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if user is None:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        else:
            pki = self.workdir / "pki"
            ctx.load_cert_chain(str(pki / f"{user}.crt"), str(pki / f"{user}.key"))
        return ctx

    def client(self, user: str | None = None, **kwargs) -> httpx.Client:
        """An HTTP client for the apiserver: the admin (system:masters), or a user made
        by :meth:`add_user`."""
        return httpx.Client(base_url=self.server, verify=self.ssl_context(user), timeout=30, **kwargs)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the built kubectl against this control plane; its discovery cache stays in workdir."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), KUBECACHEDIR=str(self.workdir / "kubectl-cache"))
        r = subprocess.run(
            [str(self.bin / "kubectl"), *args], env=env, capture_output=True, text=True, input=input, timeout=120
        )
        if check and r.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} exited with {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def apply(self, *paths: Path) -> None:
        """Server-side apply manifests (files or folders), then wait until each CRD's
        resource is served: Established, and its watch cache initialized (until then
        lists get 429 "storage is (re)initializing" and the first write waits ~2 s)."""
        for path in paths:
            self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=genq-tests", "-f", str(path))
            crds = [d for d in _documents(path) if d.get("kind") == "CustomResourceDefinition"]
            for crd in crds:
                self.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")
            with self.client() as client:
                for crd in crds:
                    spec = crd["spec"]
                    version = next(v["name"] for v in spec["versions"] if v.get("served", True))
                    self._wait_healthy("kube-apiserver", f"{self.server}/apis/{spec['group']}/{version}/{spec['names']['plural']}?limit=1", client)
        # kubectl's discovery cache predates the new resources; categories such as
        # `kubectl get genq` are only looked up there.
        shutil.rmtree(self.workdir / "kubectl-cache", ignore_errors=True)

    # lifecycle

    def stop_process(self, name: str) -> None:
        """Stop one process by its PID (SIGTERM, then SIGKILL after STOP_TIMEOUT), e.g.
        the apiserver for an outage test; :meth:`start_process` brings it back."""
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_process(self, name: str) -> None:
        """Start a stopped process again with the same flags (etcd keeps its data) and
        wait until it is healthy."""
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is running")
        args, health = self._specs[name]
        self._spawn(name, args, health)

    def stop(self) -> None:
        """Stop every process, newest first. Safe to call twice."""
        for name in reversed(list(self.processes)):
            self.stop_process(name)
        self.processes.clear()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _spawn(self, name: str, args: list[str], health: str) -> None:
        """Start ``name`` (output appended to workdir/<name>.log) and wait until ``health``
        answers 200."""
        self._specs[name] = (args, health)
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [str(self.bin / name), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to pytest does not reach it; stop() does
            )
        if health.startswith(self.server):
            client = self.client()
        else:  # etcd's plain HTTP, or the controller manager's self-signed certificate
            client = httpx.Client(verify=False)
        with client:
            self._wait_healthy(name, health, client)

    def _wait_healthy(self, name: str, url: str, client: httpx.Client) -> None:
        proc = self.processes[name]
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                r = client.get(url, timeout=5)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[-500:]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{name} not healthy at {url} after {START_TIMEOUT:.0f} s ({last}):\n{self.log_tail(name)}")


def start(
    bin: Path,
    workdir: Path,
    *,
    controller_manager: bool = True,
    manifests: Sequence[Path] = (CRDS,),
    apiserver_args: Sequence[str] = (),
    node_ip: str | None = None,
) -> ControlPlane:
    """Start etcd, kube-apiserver and (optionally) kube-controller-manager, apply
    ``manifests``, and return the running :class:`ControlPlane`. On any failure whatever
    was started is stopped again.

    ``node_ip``: the control plane of a real node (``node.py``). The apiserver listens and
    advertises there, so pods reach it through the ``kubernetes`` Service, and pods get
    ServiceAccount tokens (the admission plugin is on)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    pki.mkdir(exist_ok=True)

    # One CA signs the serving certificate and the client certificates; the apiserver
    # trusts it for client authentication (--client-ca-file), as envtest does.
    ca = _issue(_name("genq-test-ca"), None, ca=True)
    ca_file, _ = ca.write(pki, "ca")
    sans = [
        x509.DNSName("localhost"),
        *(x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc")),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(next(ipaddress.ip_network(SERVICE_CIDR).hosts())),
        *([x509.IPAddress(ipaddress.ip_address(node_ip))] if node_ip else []),
    ]
    serving_crt, serving_key = _issue(_name("kube-apiserver"), ca, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH).write(pki, "apiserver")
    admin_crt, admin_key = _issue(_name(ADMIN_USER, ADMIN_GROUP), ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH).write(pki, "admin")
    sa_key = ec.generate_private_key(ec.SECP256R1())
    (pki / "sa.key").write_bytes(sa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    etcd_port, peer_port, api_port, kcm_port = (free_port() for _ in range(4))
    host = node_ip or "127.0.0.1"
    server = f"https://{host}:{api_port}"
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(_kubeconfig(server, ca_file, admin_crt, admin_key)))
    kubeconfig.chmod(0o600)
    cp = ControlPlane(workdir, bin, server, ca_file, admin_crt, admin_key, kubeconfig, _ca=ca)
    atexit.register(cp.stop)
    try:
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        cp._spawn("etcd", [
            "--name=genq-test",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=genq-test={peer_url}",
            "--unsafe-no-fsync=true",  # envtest's: test data need not survive a power cut
            "--log-level=warn",
        ], health=f"{etcd_url}/health")

        cp._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            f"--bind-address={host}", f"--secure-port={api_port}", f"--advertise-address={host}",
            f"--tls-cert-file={serving_crt}", f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={ca_file}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={server}/",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            *(
                # Pods run: they get projected ServiceAccount tokens, and the apiserver
                # reaches the kubelet (logs, exec, port-forward) at the node's address.
                ["--kubelet-preferred-address-types=InternalIP"] if node_ip else
                # envtest's: without a kubelet no pod runs, and the ServiceAccount
                # admission plugin would require every namespace's default
                # ServiceAccount before any pod is admitted.
                ["--disable-admission-plugins=ServiceAccount"]
            ),
            "--allow-privileged=true",
            # Close watches (the controller manager's, an operator's) 1 s into a graceful
            # shutdown; unset, SIGTERM waits for them until STOP_TIMEOUT's SIGKILL.
            "--shutdown-watch-termination-grace-period=1s",
            *apiserver_args,
        ], health=f"{server}/readyz")

        # Before the controller manager starts, so its garbage collector sees the custom
        # resources at once (it rediscovers API resources only every 30 s).
        cp.apply(*manifests)

        if controller_manager:
            cp._spawn("kube-controller-manager", [
                # No --authentication/authorization-kubeconfig: nothing but the health
                # check (always allowed) calls its port, and without a front-proxy CA the
                # delegated authentication only logs errors.
                f"--kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", f"--cert-dir={workdir / 'kcm'}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={ca_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
            ], health=f"https://127.0.0.1:{kcm_port}/healthz")
    except BaseException:
        cp.stop()
        raise
    return cp


def _kubeconfig(server: str, ca: Path, crt: Path, key: Path, user: str = ADMIN_USER) -> dict:
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "genq-test", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": "genq-test", "context": {"cluster": "genq-test", "user": user, "namespace": "default"}}],
        "current-context": "genq-test",
    }


def _documents(path: Path) -> list[dict]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json")) if path.is_dir() else [path]
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


# -- pytest -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager with genq's CRDs applied.

    Skipped when the binaries are not built (``tests/k8s/build-bins.sh``), unless
    ``GENQ_K8S_REQUIRED=1`` (CI), where that is a failure.
    """
    folder = bin_dir()
    if folder is None and shutil.which(os.environ.get("GO", "go")) is not None and not os.environ.get("GENQ_K8S_BIN"):
        # First run on this machine: build them now (about 9 minutes on 2 cores, then cached
        # outside the clone and reused by every later run).
        print("building etcd + kube-apiserver + kube-controller-manager from Go modules (once) …", flush=True)
        subprocess.run([str(BUILD_SCRIPT)], check=True, timeout=3600)
        folder = bin_dir()
    if folder is None:
        reason = "Kubernetes binaries not built and no Go toolchain: run tests/k8s/build-bins.sh (or set GENQ_K8S_BIN)"
        if os.environ.get("GENQ_K8S_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="genq-k8s-", dir=tmp_path_factory.getbasetemp()))
    cp = start(folder, workdir)
    try:
        yield cp
    finally:
        cp.stop()

#!/usr/bin/env python
"""Run HFedMoE on Flower's deployment engine on this machine (loopback).

Starts a SuperLink (TLS by default), N SuperNodes (SuperNode ``i`` holds partition
``i`` of ``N`` of the embedded dataset, optionally with a memory budget), optionally
with SuperNode authentication (the nodes' public keys registered with
``flwr supernode register``), then ``flwr run . <connection> --stream``; waits for the
run directory's ``summary.json`` and stops every process it started, by PID
(SIGTERM, then SIGKILL; their children too), also on error and Ctrl-C.

    .venv/bin/python scripts/local_deployment.py --nodes 3 --rounds 2 \\
        --run-config "local-steps=1 max-length=16 num-experts=4" --out runs/deploy

Nothing is downloaded: runtime dependency installation is disabled, the Flower
configuration lives in a fresh FLWR_HOME under the work directory, every port is a
free port on 127.0.0.1. Exit code 0 when the run finished and wrote summary.json,
1 when it failed, 2 for invalid arguments, 130 when interrupted.
See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN_CERTS = ROOT / "scripts" / "gen_certs.sh"
CONNECTION = "hfedmoe-local"
#: Environment variable carried by every process the launcher starts (and, through
#: inheritance, by everything they start): how it finds them all again to stop them.
MARKER = "HFEDMOE_DEPLOYMENT_ID"
RESERVED_RUN_CONFIG = ("out", "num-server-rounds")


class DeploymentError(RuntimeError):
    """A step of the deployment failed (message says which and where the log is)."""


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[deploy {time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


# --- processes -------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry.name))
    found, stack = set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _marked(deployment_id: str) -> set[int]:
    needle = f"{MARKER}={deployment_id}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


class Processes:
    """Every process this launcher starts; stops them (and their children) by PID."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.deployment_id = uuid.uuid4().hex
        self.env = {**env, MARKER: self.deployment_id}
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.seen: set[int] = set()  # every PID ever observed below ours (re-parented ones too)

    def start(self, name: str, cmd: list[str], pipe: bool = False) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        out = subprocess.PIPE if pipe else log.open("ab")
        # Own session: Ctrl-C reaches only this launcher, which then stops everything in order.
        proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        if not pipe:
            out.close()
        self.started.append((name, proc))
        self.seen.add(proc.pid)
        return proc

    def run(self, name: str, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """A short CLI command (its output goes to its log too); stopped with the rest on timeout."""
        proc = self.start(name, cmd, pipe=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`{' '.join(cmd[:3])} ...` did not finish within {timeout:.0f}s") from None
        text = out.decode(errors="replace")
        with (self.log_dir / f"{name}.log").open("a") as f:
            f.write(text)
        return subprocess.CompletedProcess(cmd, proc.returncode, text, "")

    def remember_children(self) -> None:
        self.seen |= _descendants({p.pid for _, p in self.started} | self.seen)

    def pids(self) -> set[int]:
        self.remember_children()
        return {p for p in self.seen | _marked(self.deployment_id) if _alive(p)}

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM every process started (children included), SIGKILL what is left after ``grace_s``."""
        pids = sorted(self.pids())
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.2)
        killed = sorted(self.pids())
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.1)
        for _, proc in self.started:  # reap our own children: no zombies left behind
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        left = sorted(self.pids())
        if left:
            say(f"WARNING: processes still alive after SIGKILL: {left}")
        elif pids:
            say(f"stopped {len(pids)} processes by PID ({len(killed)} needed SIGKILL): "
                f"{' '.join(map(str, pids))}")
        return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- helpers ---------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower command from the interpreter's environment (the project's .venv), else PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"`{name}` not found: run this script with the project's .venv/bin/python")
    return found


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_log(proc: subprocess.Popen, log: Path, pattern: str, timeout: float) -> bool:
    """True once ``pattern`` appears in ``log``; False if the process exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def write_flower_config(flwr_home: Path, address: str, ca: Path | None) -> Path:
    """FLWR_HOME/config.toml (flwr >= 1.26 "SuperLink connections") with one connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    lines += [f"root-certificates = {json.dumps(str(ca))}"] if ca else ["insecure = true"]
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_tls(port: int, ca: Path) -> str:
    """Handshake with the SuperLink and verify its certificate against our CA, for 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version() or "TLS"


def run_config_keys(text: str) -> set[str]:
    return {k for k, _ in re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)}


def parse_mem_budgets(text: str | None, nodes: int) -> list[str | None]:
    if not text:
        return [None] * nodes
    budgets = [b.strip() for b in text.split(",")]
    if len(budgets) != nodes or not all(budgets):
        raise ValueError(f"--mem-budgets needs {nodes} comma-separated values (one per SuperNode), "
                         f"got {text!r}")
    return budgets


KILL_DELAY_S = 4.0  # --kill-node: seconds into the round


def checkpointed_round(out: Path) -> int:
    """The last round whose checkpoint is on disk (0: none yet)."""
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def parse_kill_node(text: str | None, nodes: int) -> tuple[int, int] | None:
    """--kill-node I@R: SuperNode I is killed a few seconds into round R."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)@(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < nodes or int(m.group(2)) < 1:
        raise ValueError(f"--kill-node takes NODE@ROUND with NODE in 0..{nodes - 1} and ROUND >= 1, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_node_data(text: str | None, nodes: int) -> list[str | None]:
    """--node-data: one data file per SuperNode (absolute paths; each node reads only its own)."""
    if not text:
        return [None] * nodes
    files = [f.strip() for f in text.split(",")]
    if len(files) != nodes or not all(files):
        raise ValueError(f"--node-data needs {nodes} comma-separated files (one per SuperNode), got {text!r}")
    missing = [f for f in files if not Path(f).expanduser().is_file()]
    if missing:
        raise ValueError(f"--node-data: no such file {missing[0]}")
    if any('"' in f for f in files):
        raise ValueError("--node-data: a file name must not contain a double quote")
    return [str(Path(f).expanduser().resolve()) for f in files]


def parse_node_columns(text: str) -> str:
    """--node-columns 'text-column=body label-column=topic': the column names of every node's file."""
    allowed = {"text-column", "label-column", "choices-column", "answer-column", "response-column"}
    pairs = re.findall(r"(\S+?)=(\S+)", text or "")
    bad = [k for k, _ in pairs if k not in allowed]
    if bad or len(pairs) != len((text or "").split()):
        raise ValueError(f"--node-columns takes {' '.join(sorted(allowed))} as key=value pairs, got {text!r}")
    return " ".join(f'{k}="{v}"' for k, v in pairs)


# --- the deployment --------------------------------------------------------------------

class Deployment:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = work / "flwr-home"
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else Flower builds a fresh env
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        })
        self.procs = Processes(env, self.logs)
        self.certs: Path | None = None
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.superlink_log = self.logs / "superlink.log"
        self.supernodes: list[tuple[subprocess.Popen, Path]] = []  # (process, its log)
        self.node_configs: list[str] = []
        self.killed: set[int] = set()  # SuperNodes killed on purpose (--kill-node), not a failure

    # -- certificates
    def make_certs(self) -> None:
        if self.args.insecure:
            say("TLS: off (--insecure): traffic between SuperLink, SuperNodes and flwr is not encrypted")
            return
        self.certs = Path(self.args.certs).resolve() if self.args.certs else self.work / "certs"
        nodes = self.args.nodes if self.args.auth else 0
        proc = subprocess.run(["bash", str(GEN_CERTS), str(self.certs), str(nodes)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise DeploymentError(f"gen_certs.sh failed: {proc.stderr.strip()}")
        say(f"certificates: {self.certs} (CA ca.crt, SuperLink server.pem for 127.0.0.1/localhost"
            + (f", {nodes} SuperNode key pairs" if nodes else "") + ")")

    # -- SuperLink
    def superlink_command(self) -> list[str]:
        cmd = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.args.kill_server_after:  # state on disk, so a restarted SuperLink knows the SuperNodes
            cmd += ["--database", str(self.work / "superlink.db")]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                    "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        if self.args.auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def start_superlink(self) -> None:
        for attempt in range(3):  # a free port can be taken by someone else before we bind it
            self.port = free_port()
            cmd = self.superlink_command()
            name = f"superlink-{attempt}" if attempt else "superlink"
            say(f"starting SuperLink on 127.0.0.1:{self.port}" + (" (TLS" if self.certs else " (insecure")
                + (", SuperNode auth)" if self.args.auth else ")"))
            proc = self.procs.start(name, cmd)
            if wait_for_log(proc, self.logs / f"{name}.log", r"Uvicorn running on", timeout=120):
                self.superlink, self.superlink_log = proc, self.logs / f"{name}.log"
                break
            log = self.logs / f"{name}.log"
            if proc.poll() is None or "address already in use" not in log.read_text(errors="replace").lower():
                raise DeploymentError(f"SuperLink did not start; log {log}:\n{tail(log)}")
            say(f"port {self.port} was taken meanwhile, retrying")
        else:
            raise DeploymentError("SuperLink could not bind a free port in 3 attempts")
        scheme = "https" if self.certs else "http"
        say(f"SuperLink ready at {scheme}://127.0.0.1:{self.port} (PID {self.superlink.pid}; "
            "Fleet, Control and Runtime API share this port)")
        if self.certs:
            try:
                version = check_tls(self.port, self.certs / "ca.crt")
            except (ssl.SSLError, OSError) as err:
                raise DeploymentError(f"TLS handshake with the SuperLink failed: {err}") from err
            say(f"TLS verified: {version}, the SuperLink's certificate for 127.0.0.1 is signed by "
                f"{self.certs / 'ca.crt'}")
        config = write_flower_config(self.flwr_home, f"127.0.0.1:{self.port}",
                                     self.certs / "ca.crt" if self.certs else None)
        say(f"SuperLink connection '{CONNECTION}' written to {config}")

    # -- SuperNode authentication
    def register_nodes(self) -> None:
        assert self.certs is not None
        for i in range(self.args.nodes):
            pub = self.certs / f"supernode-{i}.pub"
            res = self.procs.run(f"register-{i}", [flower_bin("flwr"), "supernode", "register", str(pub),
                                                   CONNECTION, "--name", f"supernode-{i}"])
            if res.returncode != 0:
                raise DeploymentError(f"`flwr supernode register {pub}` failed:\n{res.stdout.strip()[-2000:]}")
            found = re.search(r"SuperNode (\d+) registered", res.stdout)
            say(f"registered SuperNode {i}'s public key {pub.name}"
                + (f" (node id {found.group(1)})" if found else ""))

    def verify_auth(self, timeout: float = 90) -> None:
        """Prove authentication is enforced: a SuperNode with an unregistered key must be refused."""
        key = self.work / "unregistered-supernode"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "unregistered",
                            "-f", str(key)], check=True, capture_output=True)
        cmd = [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
               "--port", str(free_port()), "--root-certificates", str(self.certs / "ca.crt"),
               "--node-config", f"partition-id=0 num-partitions={self.args.nodes}",
               "--auth-supernode-private-key", str(key)]
        proc = self.procs.start("unregistered-supernode", cmd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError("SuperNode authentication is NOT enforced: a SuperNode with an unregistered "
                                  f"key was not refused within {timeout:.0f}s") from None
        log = self.logs / "unregistered-supernode.log"
        refused = "No SuperNode found with the given public key" in self.superlink_log.read_text(errors="replace")
        if code == 0 or not refused:
            raise DeploymentError(f"the unregistered SuperNode exited with code {code} for another reason; "
                                  f"log {log}:\n{tail(log)}")
        say(f"SuperNode authentication verified: a SuperNode with an unregistered key was refused "
            f"(exit code {code}; SuperLink: 'No SuperNode found with the given public key')")

    # -- SuperNodes
    def supernode_command(self, i: int, node_config: str) -> list[str]:
        port = free_port()  # the SuperNode's own Runtime API (its ClientApp processes use it)
        cmd = [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
               "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]
        cmd += ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs / "ca.crt")]
        if self.args.auth:
            cmd += ["--auth-supernode-private-key", str(self.certs / f"supernode-{i}")]
        return cmd

    def start_supernodes(self) -> None:
        """Start all SuperNodes at once, then wait for each (retrying one whose port was taken)."""
        budgets = parse_mem_budgets(self.args.mem_budgets, self.args.nodes)
        files = parse_node_data(self.args.node_data, self.args.nodes)
        columns = parse_node_columns(self.args.node_columns)
        configs = []
        for i in range(self.args.nodes):
            node_config = f"partition-id={i} num-partitions={self.args.nodes}"
            if budgets[i]:
                node_config += f' mem-budget="{budgets[i]}"'
            if files[i]:  # the node's own data: only this SuperNode's ClientApp reads it
                node_config += f' data-path="{files[i]}"' + (f" {columns}" if columns else "")
            configs.append(node_config)
            self.node_configs.append(node_config)
            self.supernodes.append((self.procs.start(f"supernode-{i}", self.supernode_command(i, node_config)),
                                    self.logs / f"supernode-{i}.log"))
        for i, node_config in enumerate(configs):
            for attempt in range(1, 4):
                proc, log = self.supernodes[i]
                if wait_for_log(proc, log, r"Uvicorn running on", timeout=120):
                    break
                if (proc.poll() is None or attempt == 3
                        or "address already in use" not in log.read_text(errors="replace").lower()):
                    raise DeploymentError(f"SuperNode {i} did not start; log {log}:\n{tail(log)}")
                name = f"supernode-{i}-{attempt}"
                self.supernodes[i] = (self.procs.start(name, self.supernode_command(i, node_config)),
                                      self.logs / f"{name}.log")
            say(f"started SuperNode {i} (PID {proc.pid}, node config: {node_config})")
        self.wait_nodes_online()

    def wait_nodes_online(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        online = -1
        while time.monotonic() < deadline:
            self.check_alive()
            res = self.procs.run("supernode-ls", [flower_bin("flwr"), "supernode", "ls", CONNECTION,
                                                  "--format", "json"])
            try:
                nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
            except (ValueError, KeyError):
                nodes = []
            count = sum(1 for n in nodes if n.get("status") == "online")
            if count != online:
                online = count
                say(f"{count}/{self.args.nodes} SuperNodes online")
            if count >= self.args.nodes:
                return
            time.sleep(2)
        raise DeploymentError(f"only {online} of {self.args.nodes} SuperNodes came online within "
                              f"{timeout:.0f}s; logs in {self.logs}")

    def check_alive(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            log = self.superlink_log
            raise DeploymentError(f"the SuperLink exited (code {self.superlink.returncode}); log {log}:\n{tail(log)}")
        for i, (node, log) in enumerate(self.supernodes):
            if node.poll() is not None and i not in self.killed:
                raise DeploymentError(f"SuperNode {i} exited (code {node.returncode}); log {log}:\n{tail(log)}")

    # -- faults (--kill-node)
    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and every process below it (its ClientApp, mid-round)."""
        proc, _ = self.supernodes[i]
        tree = _descendants({proc.pid}) | {proc.pid}
        for pid in sorted(tree):
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.killed.add(i)
        say(f"killed SuperNode {i} (SIGKILL, PIDs {' '.join(map(str, sorted(tree)))})")

    def restart_node(self, i: int) -> None:
        name = f"supernode-{i}-restarted"
        proc = self.procs.start(name, self.supernode_command(i, self.node_configs[i]))
        log = self.logs / f"{name}.log"
        if not wait_for_log(proc, log, r"Uvicorn running on", timeout=120):
            raise DeploymentError(f"restarted SuperNode {i} did not start; log {log}:\n{tail(log)}")
        self.supernodes[i] = (proc, log)
        self.killed.discard(i)
        say(f"restarted SuperNode {i} (PID {proc.pid}, node config: {self.node_configs[i]})")

    # -- the server's loss (--kill-server-after)
    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything below it (its SuperExec and the ServerApp)."""
        tree = _descendants({self.superlink.pid}) | {self.superlink.pid}
        for pid in sorted(tree):
            _signal(pid, signal.SIGKILL)
        self.superlink.wait(timeout=10)
        say(f"killed the SuperLink and the ServerApp (SIGKILL, PIDs {' '.join(map(str, sorted(tree)))})")

    def restart_superlink(self) -> None:
        """The SuperLink again, on the same port and database: the SuperNodes reconnect."""
        name = "superlink-restarted"
        proc = self.procs.start(name, self.superlink_command())
        log = self.logs / f"{name}.log"
        if not wait_for_log(proc, log, r"Uvicorn running on", timeout=120):
            raise DeploymentError(f"the restarted SuperLink did not start; log {log}:\n{tail(log)}")
        self.superlink, self.superlink_log = proc, log
        say(f"restarted the SuperLink on 127.0.0.1:{self.port} (PID {proc.pid})")
        self.wait_nodes_online()

    # -- the run
    def run(self, out: Path) -> dict:
        """``flwr run`` to the end; with --kill-server-after K, the SuperLink and ServerApp
        are killed once round K is checkpointed, restarted, and the run resumed."""
        kill_after = self.args.kill_server_after
        if kill_after:
            if self.flwr_run(out, stop_after_round=kill_after) is not None:
                raise DeploymentError(f"the run ended before round {kill_after} was checkpointed")
            self.kill_superlink()
            self.restart_superlink()
        return self.flwr_run(out, resume=bool(kill_after))

    def flwr_run(self, out: Path, resume: bool = False, stop_after_round: int = 0) -> dict | None:
        """One ``flwr run``: its summary, or None once ``stop_after_round`` is checkpointed
        (the run is left running for the caller to kill)."""
        run_config = [f"num-server-rounds={self.args.rounds} out='{out}'" + (" resume=true" if resume else "")
                      # the fault waits for round K's checkpoint: every round is checkpointed
                      + (" checkpoint-interval=0" if self.args.kill_server_after else "")]
        if self.args.run_config:
            run_config.append(self.args.run_config)
        cmd = [flower_bin("flwr"), "run", str(self.args.app), CONNECTION, "--stream"]
        for rc in run_config:
            cmd += ["--run-config", rc]
        say(f"flwr run {self.args.app} {CONNECTION} --run-config \"{' '.join(run_config)}\" --stream")
        proc = self.procs.start("flwr-run-resumed" if resume else "flwr-run", cmd, pipe=True)
        run_id: list[str] = []
        kill = parse_kill_node(self.args.kill_node, self.args.nodes) if not resume else None
        round_started: dict[int, float] = {}  # round -> when its "[ROUND r/R]" line came

        def pump() -> None:  # stream Flower's log to the console and to flwr-run.log
            with (self.logs / "flwr-run.log").open("a") as log:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    log.write(line)
                    log.flush()
                    if not run_id and (m := re.search(r"Successfully started run (\d+)", line)):
                        run_id.append(m.group(1))
                    if m := re.search(r"\[ROUND (\d+)/\d+\]", line):
                        round_started.setdefault(int(m.group(1)), time.monotonic())
                    if not self.args.quiet:
                        sys.stdout.write("  | " + line)
                        sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        summary = out / "summary.json"
        deadline = time.monotonic() + self.args.timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise DeploymentError(f"the run did not finish within {self.args.timeout:.0f}s (--timeout)")
            if kill and kill[1] in round_started and time.monotonic() > round_started[kill[1]] + KILL_DELAY_S:
                self.kill_node(kill[0])  # a few seconds into the round: the node holds its instruction
                if self.args.restart_killed:
                    self.restart_node(kill[0])
                kill = None
            if stop_after_round and checkpointed_round(out) >= stop_after_round:
                say(f"round {checkpointed_round(out)} is checkpointed")
                proc.kill()  # the CLI's stream only; the SuperLink and ServerApp go next
                proc.wait(timeout=10)
                return None
            self.check_alive()
            self.procs.remember_children()
            time.sleep(0.5)
        reader.join(timeout=10)
        # `flwr run --stream` returns once the run is finished; summary.json is the ServerApp's last write.
        grace = time.monotonic() + 30
        while not summary.exists() and time.monotonic() < grace and proc.returncode == 0:
            time.sleep(0.5)
        if proc.returncode != 0 or not summary.exists():
            status = self.run_status(run_id[0]) if run_id else "unknown"
            raise DeploymentError(f"the run failed (flwr run exit code {proc.returncode}, run status "
                                  f"{status}, no {summary}); logs in {self.logs}:\n"
                                  f"{tail(self.logs / 'flwr-run.log')}")
        return json.loads(summary.read_text())

    def run_status(self, run_id: str) -> str:
        res = self.procs.run("flwr-ls", [flower_bin("flwr"), "ls", CONNECTION, "--run-id", run_id,
                                         "--format", "json"])
        try:
            runs = json.loads(res.stdout[res.stdout.index("{"):]).get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except ValueError:
            return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run HFedMoE on Flower's deployment engine locally: a SuperLink, N SuperNodes, flwr run.")
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes (= clients); node i holds partition i of N (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds, num-server-rounds (default 3)")
    p.add_argument("--run-config", default="",
                   help="extra run config, e.g. \"local-steps=1 max-length=16\" (keys of [tool.flwr.app.config]; "
                        "not out / num-server-rounds: use --out / --rounds)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="insecure", action="store_false", default=False,
                     help="TLS between SuperLink, SuperNodes and flwr, with a self-signed CA from scripts/gen_certs.sh (the default)")
    tls.add_argument("--insecure", dest="insecure", action="store_true", help="no TLS (plain HTTP)")
    p.add_argument("--auth", action="store_true",
                   help="SuperNode authentication: SuperLink --enable-supernode-auth, each node's public key "
                        "registered with `flwr supernode register` (needs TLS)")
    p.add_argument("--mem-budgets", default=None,
                   help="memory budget per SuperNode, comma-separated, e.g. 1GB,800MB (node config mem-budget)")
    p.add_argument("--node-data", default=None,
                   help="each SuperNode's own data file, comma-separated (node config data-path); without it "
                        "node i trains on partition i of the run's dataset")
    p.add_argument("--node-columns", default="",
                   help="column names of the --node-data files, e.g. 'text-column=body label-column=topic'")
    p.add_argument("--kill-node", default=None,
                   help="fault injection: SIGKILL SuperNode I (and its ClientApp) a few seconds into round R, "
                        "as I@R; the round completes with the others within the run config's round-timeout")
    p.add_argument("--restart-killed", action="store_true",
                   help="with --kill-node: start the killed SuperNode again at once (same node config); the "
                        "server gives it its partition back in the next round")
    p.add_argument("--kill-server-after", type=int, default=0,
                   help="fault injection: once round K is checkpointed, SIGKILL the SuperLink and the ServerApp, "
                        "restart the SuperLink (same port, its state in a database file) and resume the run")
    p.add_argument("--out", default=None, help="run directory (default: runs/deploy-<timestamp>)")
    p.add_argument("--certs", default=None,
                   help="certificate directory (created with scripts/gen_certs.sh if missing; default: in --workdir)")
    p.add_argument("--workdir", default=None,
                   help="FLWR_HOME, certificates and process logs (default: a new temporary directory, "
                        "removed after a successful run)")
    p.add_argument("--app", default=str(ROOT), help="the Flower app directory")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the run may take (default 3600)")
    p.add_argument("--quiet", action="store_true", help="do not echo Flower's run log (it is still in the logs)")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 0 <= args.kill_server_after < args.rounds:
        p.error(f"--kill-server-after must lie in [1, --rounds - 1] (0: off), got {args.kill_server_after}")
    if args.restart_killed and not args.kill_node:
        p.error("--restart-killed restarts the node of --kill-node: give --kill-node I@R")
    if args.auth and args.insecure:
        p.error("--auth needs TLS (Flower refuses SuperNode authentication without it): drop --insecure")
    if bad := run_config_keys(args.run_config) & set(RESERVED_RUN_CONFIG):
        p.error(f"--run-config must not set {', '.join(sorted(bad))}: use --out / --rounds")
    try:
        parse_mem_budgets(args.mem_budgets, args.nodes)
        parse_node_data(args.node_data, args.nodes)
        parse_node_columns(args.node_columns)
        parse_kill_node(args.kill_node, args.nodes)
    except ValueError as err:
        p.error(str(err))
    args.out = Path(args.out or ROOT / "runs" / time.strftime("deploy-%Y%m%d-%H%M%S")).resolve()
    if "'" in str(args.out):
        p.error("--out must not contain a single quote")
    if (args.out / "metrics.jsonl").exists():
        p.error(f"{args.out} already holds a run (metrics.jsonl): choose another --out")
    args.app = Path(args.app).resolve()
    if not (args.app / "pyproject.toml").is_file():
        p.error(f"{args.app} is not a Flower app (no pyproject.toml)")
    return args


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    own_work = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="hfedmoe-deploy-")) if own_work else Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say(f"work directory {work} (FLWR_HOME, logs); run directory {args.out}")
    started = time.monotonic()
    deployment = Deployment(args, work)
    code = 1
    try:
        deployment.make_certs()
        deployment.start_superlink()
        if args.auth:
            deployment.register_nodes()
            deployment.verify_auth()
        deployment.start_supernodes()
        summary = deployment.run(args.out)
        say(f"run finished in {time.monotonic() - started:.0f}s: accuracy {summary.get('initial_accuracy', 0):.4f}"
            f" -> {summary.get('final_accuracy', 0):.4f} after {summary.get('rounds')} rounds; "
            f"{args.out / 'metrics.jsonl'}")
        code = 0
    except DeploymentError as err:
        say(f"FAILED: {err}")
    except Interrupted as sig:
        say(f"interrupted ({sig}): stopping everything")
        code = 130
    finally:
        # Block further signals' exceptions while stopping: stopping must complete.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        deployment.procs.stop()
        if code == 0 and own_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs kept in {deployment.logs}")
    return code


if __name__ == "__main__":
    sys.exit(main())

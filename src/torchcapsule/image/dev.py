"""`capsule dev`: the `docker run` argv of the dev container (pure), safe by default.

Teams usually type `docker run -d --gpus all -p 8888:8888 -p 2222:22 -v $(pwd)/workspace:/workspace IMAGE`;
this adds what they forget: ports bound to 127.0.0.1 (unless public), shared memory for DataLoader
workers, all four volumes, the host user's uid/gid, an injected public key and a token from a
0600 file. It decides; the CLI runs it.

The container never holds root (docs/image.md, "Threat model"): it runs as --user HOST_UID:HOST_GID
with no capabilities and no-new-privileges; /run/capsule is a fresh tmpfs at every start; the
home is a per-dev-box host directory, so the ssh host keys survive `docker rm` and re-create.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

VOLUMES = ("workspace", "data", "models", "logs")
TOKEN_IN_CONTAINER = "/run/secrets/capsule_jupyter_token"
KEY_IN_CONTAINER = "/run/secrets/capsule_authorized_keys"
SSH_IN_CONTAINER = 2222  # sshd runs as the user, so it listens on an unprivileged port
# What the dev box may do beyond a plain process: nothing. Its entrypoint, sshd and Jupyter all
# run as the user, so it needs no capability at all.
SECURITY_ARGS = ("--security-opt", "no-new-privileges", "--cap-drop", "ALL")


@dataclass(frozen=True)
class DevOptions:
    image: str
    name: str
    volumes: dict[str, Path]  # volume name -> absolute host path
    jupyter_port: int = 8888
    ssh_port: int = 2222
    public: bool = False
    gpus: bool = False  # host has NVIDIA GPUs (decided by the caller's probe)
    ipc_host: bool = True
    shm_size: str | None = None  # used when ipc_host is False
    network: str | None = None  # "host": no port publishing; services bind themselves
    host_uid: int = 1000
    host_gid: int = 1000
    home: Path | None = None  # host directory mounted as the user's home (keeps ssh host keys)
    user_home: str = "/home/mluser"
    read_only: bool = False  # read-only root filesystem; tmpfs for /tmp and /run/capsule
    pubkey_file: Path | None = None
    token_file: Path | None = None
    ssh: bool = True  # the image has sshd (jupyter-ssh flavor)
    extra_env: dict[str, str] = field(default_factory=dict)


def docker_run_argv(o: DevOptions) -> list[str]:
    bind = "0.0.0.0" if o.public else "127.0.0.1"
    argv = ["docker", "run", "-d", "--name", o.name, "--user", f"{o.host_uid}:{o.host_gid}", *SECURITY_ARGS,
            "--tmpfs", f"/run/capsule:rw,nosuid,nodev,noexec,mode=0700,uid={o.host_uid},gid={o.host_gid}"]
    if o.read_only:
        # exec: torch.compile builds and loads kernels under /tmp
        argv += ["--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,nodev,mode=1777"]
    if o.gpus:
        argv += ["--gpus", "all"]
    if o.ipc_host:
        argv += ["--ipc=host"]
    else:
        argv += [f"--shm-size={o.shm_size or '8g'}"]
    env: dict[str, str] = {}
    if o.network == "host":
        # Host networking publishes nothing: the services themselves bind the address and ports.
        argv += ["--network", "host"]
        env.update({"JUPYTER_IP": bind, "JUPYTER_PORT": str(o.jupyter_port)})
        if o.ssh:
            env.update({"SSH_BIND": bind, "SSH_PORT": str(o.ssh_port)})
    else:
        if o.network:
            argv += ["--network", o.network]
        argv += ["-p", f"{bind}:{o.jupyter_port}:8888"]
        if o.ssh:
            argv += ["-p", f"{bind}:{o.ssh_port}:{SSH_IN_CONTAINER}"]
    for vol in VOLUMES:
        argv += ["-v", f"{o.volumes[vol]}:/{vol}"]
    if o.home is not None:
        argv += ["-v", f"{o.home}:{o.user_home}"]
    if o.token_file is not None:
        argv += ["-v", f"{o.token_file}:{TOKEN_IN_CONTAINER}:ro"]
        env["JUPYTER_TOKEN_FILE"] = TOKEN_IN_CONTAINER
    if o.ssh and o.pubkey_file is not None:
        argv += ["-v", f"{o.pubkey_file}:{KEY_IN_CONTAINER}:ro"]
        env["SSH_AUTHORIZED_KEYS_FILE"] = KEY_IN_CONTAINER
    env.update(o.extra_env)
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    argv += [o.image, "dev"]
    return argv


def shell_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def connect_info(o: DevOptions, token: str | None, user: str, host_alias: str) -> dict[str, str]:
    """The Jupyter URL, the ssh command and a ~/.ssh/config entry for the started container."""
    host = "127.0.0.1"
    url = f"http://{host}:{o.jupyter_port}/lab" + (f"?token={token}" if token else "")
    info = {"jupyter_url": url}
    if o.ssh:
        ident = ""
        if o.pubkey_file is not None and str(o.pubkey_file).endswith(".pub"):
            ident = str(o.pubkey_file)[:-4]
        id_opt = f" -i {ident}" if ident else ""
        info["ssh"] = f"ssh{id_opt} -p {o.ssh_port} {user}@{host}"
        cfg = [f"Host {host_alias}", f"    HostName {host}", f"    Port {o.ssh_port}", f"    User {user}"]
        if ident:
            cfg.append(f"    IdentityFile {ident}")
        # Each dev box has its own host keys (kept in its home across re-create): keep them out
        # of the main known_hosts.
        cfg += ["    UserKnownHostsFile ~/.ssh/known_hosts.capsule", "    StrictHostKeyChecking accept-new"]
        info["ssh_config"] = "\n".join(cfg)
    return info

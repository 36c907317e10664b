"""`capsule image render|lock|lint|build|push` and `capsule dev`."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from ..errors import ConfigError, ImageError
from ._common import console, file_option, json_option, load, print_json


def override_options(f):
    """--torch/--cuda/--python/--flavor/--base: override capsule.yaml's image section."""
    for opt in reversed([
        click.option("--torch", default=None, help="torch release, e.g. 2.9.1 (overrides image.torch)."),
        click.option("--cuda", default=None, help="CUDA version (12.8, cu128) or cpu (overrides image.cuda)."),
        click.option("--python", default=None, help="Python minor version, e.g. 3.12 (overrides image.python)."),
        click.option("--flavor", default=None, help="jupyter-ssh or slim (overrides image.flavor)."),
        click.option("--base", default=None, help="Base image to start from (overrides image.base)."),
    ]):
        f = opt(f)
    return f


def _spec(file, torch, cuda, python, flavor, base):
    from ..image.spec import resolve

    project = load(file)
    return project, resolve(project, torch=torch, cuda=cuda, python=python, flavor=flavor, base=base)


def _torch_index_option(f):
    return click.option("--torch-index", default=None, metavar="URL",
                        help="PyTorch wheel index or a mirror of it (default: none for the CUDA build PyPI "
                             "serves, else download.pytorch.org/whl/<cpu|cuXXX>; "
                             "'none': only pip's own config; env CAPSULE_TORCH_INDEX).")(f)


@click.group()
def image() -> None:
    """Render, lock, lint and build the project image."""


@image.command()
@file_option
@override_options
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Directory to write (default: <project>/.capsule/render/<flavor>).")
def render(file, torch, cuda, python, flavor, base, output) -> None:
    """Write the Dockerfile, entrypoint, sshd and Jupyter configs."""
    from ..image import render as r

    project, spec = _spec(file, torch, cuda, python, flavor, base)
    out = Path(output) if output else project.root / ".capsule" / "render" / spec.flavor
    paths = r.write(r.render(spec), out)
    con = console()
    con.print(f"[green]rendered[/] {spec.tag} (base {spec.base}) into {out}/")
    for p in paths:
        con.print(f"  {p.name}")


@image.command("lock")
@file_option
@override_options
@_torch_index_option
def lock_cmd(file, torch, cuda, python, flavor, base, torch_index) -> None:
    """Pin every Python package (with hashes) into capsule.lock and capsule.dev.lock."""
    from ..image import build as b
    from ..image import lock as lk
    from ..image.wheelhouse import Target

    project, spec = _spec(file, torch, cuda, python, flavor, base)
    con = console()
    with con.status(f"asking {spec.base} for its Python"):
        try:
            b.require_engine()
            full = b.base_python(spec)
        except ImageError:
            from ..image.spec import KNOWN_PYTHONS

            if spec.base not in KNOWN_PYTHONS:
                raise
            full = b.base_python(spec, use_docker=False)
    with con.status(f"resolving wheels for CPython {full}"):
        paths = lk.lock(spec, Target(full), project.root, torch_index=spec.torch_index_for(torch_index))
    for p in paths:
        _, entries = lk.parse_lock(p.read_text())
        con.print(f"[green]locked[/] {p} ({len(entries)} packages, Python {full})")


@image.command()
@file_option
@override_options
@json_option
def lint(file, torch, cuda, python, flavor, base, as_json) -> None:
    """Run hadolint on the rendered Dockerfiles of both flavors."""
    import tempfile

    from ..image import lint as l
    from ..image import render as r
    from ..image.spec import FLAVORS

    project, spec = _spec(file, torch, cuda, python, flavor, base)
    flavors = [spec.flavor] if flavor else list(FLAVORS)
    findings = []
    with tempfile.TemporaryDirectory(prefix="capsule-lint-") as tmp:
        for fl in flavors:
            d = Path(tmp) / fl
            r.write(r.render(spec.with_flavor(fl)), d)
            findings += [(fl, f) for f in l.lint_file(d / "Dockerfile")]
    if as_json:
        print_json({"flavors": flavors, "findings": [{"flavor": fl, **f.__dict__} for fl, f in findings]})
    else:
        con = console()
        for fl, f in findings:
            con.print(f"{fl}: Dockerfile:{f.line}: {f.code} {f.level}: {f.message}")
        if not findings:
            con.print(f"[green]ok[/] hadolint: no findings in the {' and '.join(flavors)} Dockerfiles")
    if findings:
        raise ImageError(f"hadolint reported {len(findings)} finding(s) in the rendered Dockerfiles; "
                         "fix the template or report a bug")


@image.command()
@file_option
@override_options
@_torch_index_option
@click.option("-v", "--verbose", is_flag=True, help="Print every line of Docker's output.")
@json_option
def build(file, torch, cuda, python, flavor, base, torch_index, verbose, as_json) -> None:
    """Build the image from the lock, hermetically, and tag it when it succeeds."""
    from ..image import build as b

    project, spec = _spec(file, torch, cuda, python, flavor, base)
    con = console()
    status = con.status(f"building {spec.tag}")

    def on_line(line: str) -> None:
        if verbose:
            con.print(line, markup=False, highlight=False)
        elif line.startswith("Step ") or line.startswith("#"):
            status.update(f"building {spec.tag}: {line[:100]}")

    with status:
        res = b.build(spec, project.root, torch_index=spec.torch_index_for(torch_index), on_line=on_line,
                      on_status=lambda s: status.update(s))
    if as_json:
        print_json({"tag": res.tag, "id": res.image_id, "size_bytes": res.size_bytes,
                    "seconds": round(res.seconds, 1), "lock_sha256": res.lock_hash})
    else:
        con.print(f"[green]built[/] {res.tag} ({res.image_id[:19]}) size {res.size_bytes / 1e9:.2f} GB "
                  f"in {res.seconds:.0f} s")


@image.command()
@file_option
@override_options
@click.option("--registry", default=None, metavar="HOST/PREFIX",
              help="Registry repository prefix, e.g. 127.0.0.1:5070/acme (default: image.registry).")
@click.option("--latest", is_flag=True, help="Also move the latest-<flavor> tag to this image.")
@json_option
def push(file, torch, cuda, python, flavor, base, registry, latest, as_json) -> None:
    """Push the built image and record its digest in .capsule/pushed.json."""
    from ..image import push as p

    project, spec = _spec(file, torch, cuda, python, flavor, base)
    with console().status(f"pushing {spec.tag}"):
        rec = p.push(spec, project.root, registry=registry, latest=latest)
    if as_json:
        print_json({"flavor": spec.flavor, "record": str(p.record_path(project.root)), **rec.__dict__})
        return
    con = console()
    con.print(f"[green]pushed[/] {rec.pinned}")
    con.print(f"  tags: {', '.join(rec.tags)}")
    con.print(f"  {rec.layers_pushed} layer(s) uploaded, {rec.layers_reused} already there, {rec.seconds:.1f} s; "
              f"recorded in {p.record_path(project.root)}")


# -- capsule dev ---------------------------------------------------------------------------------
def _default_pubkey() -> Path | None:
    for name in ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"):
        p = Path.home() / ".ssh" / name
        if p.is_file():
            return p
    return None


def _host_ids(project, uid: int | None, gid: int | None, image_ids: tuple[int, int]) -> tuple[int, int, bool]:
    """(uid, gid, owned) the container runs as: --uid/--gid, else the caller, else (when the caller
    is root, e.g. under sudo) the owner of the workspace directory, else the image's own user.
    Never root: --uid 0/--gid 0 are refused. `owned` is False when no non-root owner was found."""
    for flag, v in (("--uid", uid), ("--gid", gid)):
        if v == 0:
            raise ConfigError(f"{flag} 0: the dev box never runs as root; pass a non-root id "
                              f"(e.g. {flag} $(id -{flag[2]}) as a normal user)")
        if v is not None and v < 0:
            raise ConfigError(f"{flag} {v}: ids are non-negative numbers; pass e.g. {flag} $(id -{flag[2]})")
    if uid is None:
        uid, gid_default = os.getuid(), os.getgid()
        if uid == 0:
            ws = project.volume_path("workspace")
            st = ws.stat() if ws.exists() else None
            uid, gid_default = (st.st_uid, st.st_gid) if st else (0, 0)
    else:
        gid_default = uid
    gid = gid if gid is not None else gid_default
    if uid == 0:
        return image_ids[0], image_ids[1], False
    return uid, gid or image_ids[1], True


@click.command()
@file_option
@click.option("--image", "image_ref", default=None, help="Image to run (default: the project's jupyter-ssh tag).")
@click.option("--name", default=None, help="Container name (default: <project>-dev).")
@click.option("--jupyter-port", type=click.IntRange(1, 65535), default=8888, show_default=True)
@click.option("--ssh-port", type=click.IntRange(1, 65535), default=2222, show_default=True)
@click.option("--public", is_flag=True, help="Publish on all interfaces instead of 127.0.0.1.")
@click.option("--key", "key", type=click.Path(dir_okay=False), default=None,
              help="Public key to authorize (default: ~/.ssh/id_ed25519.pub, id_ecdsa.pub or id_rsa.pub).")
@click.option("--gpus/--no-gpus", default=None, help="Pass --gpus all (default: when this host has NVIDIA GPUs).")
@click.option("--shm-size", default=None, help="Use --shm-size SIZE instead of --ipc=host.")
@click.option("--network", default=None, help="Docker network (default: targets.docker.network; 'host' binds services directly).")
@click.option("--uid", "uid", type=int, default=None, help="Host uid the container runs as and that owns files written to the volumes (default: yours; under root, the workspace's owner; never 0).")
@click.option("--gid", "gid", type=int, default=None, help="Host gid (default: yours; never 0).")
@click.option("--read-only", "read_only", is_flag=True,
              help="Read-only root filesystem (only the volumes, the home, /tmp and /run/capsule are writable).")
@click.option("--dry-run", is_flag=True, help="Print the exact docker run command and exit.")
@json_option
def dev(file, image_ref, name, jupyter_port, ssh_port, public, key, gpus, shm_size, network, uid, gid,
        read_only, dry_run, as_json) -> None:
    """Start the Jupyter/SSH dev container, safe by default."""
    import secrets
    import subprocess

    from .._util import mkdir_owned
    from ..config import parse_size
    from ..doctor.probes import gpu_names
    from ..image import dev as d
    from ..image.spec import resolve

    project = load(file)
    if jupyter_port == ssh_port:
        raise ConfigError("--ssh-port: equals --jupyter-port; pick two different ports")
    if shm_size is not None:
        try:
            parse_size(shm_size)
        except ValueError as e:
            raise ConfigError(f"--shm-size: {e}") from None
    spec = resolve(project, flavor="jupyter-ssh")
    image_ref = image_ref or spec.tag
    name = name or f"{project.name}-dev"
    if key is not None:
        pubkey = Path(key).expanduser().resolve()
        if not pubkey.is_file():
            raise ConfigError(f"--key: {pubkey} does not exist; pass the path of an ssh public key (*.pub)")
    else:
        pubkey = _default_pubkey()
    if pubkey is not None and " PRIVATE KEY" in pubkey.read_text()[:200]:
        raise ConfigError(f"--key: {pubkey} is a private key; pass the public key ({pubkey}.pub)")
    state = project.root / ".capsule" / "dev" / name
    token_file = state / "jupyter_token"
    host_uid, host_gid, owned = _host_ids(project, uid, gid, (spec.uid, spec.gid))
    home = (state / "home").resolve()
    opts = d.DevOptions(
        image=image_ref, name=name,
        volumes={v: project.volume_path(v) for v in d.VOLUMES},
        jupyter_port=jupyter_port, ssh_port=ssh_port, public=public,
        gpus=bool(gpu_names()) if gpus is None else gpus,
        ipc_host=shm_size is None and project.targets.docker.ipc_host,
        shm_size=shm_size, network=network or project.targets.docker.network,
        host_uid=host_uid, host_gid=host_gid, home=home, user_home=f"/home/{spec.user}", read_only=read_only,
        pubkey_file=pubkey, token_file=token_file.resolve(),
    )
    argv = d.docker_run_argv(opts)
    # The token file exists before the command is shown, so a printed command works as is
    # (a missing bind-mount source would become an empty directory).
    state.mkdir(parents=True, exist_ok=True)
    if not token_file.is_file() or not token_file.read_text().strip():
        old = os.umask(0o077)
        try:
            token_file.write_text(secrets.token_hex(24))
        finally:
            os.umask(old)
    token_file.chmod(0o600)
    if os.geteuid() == 0:  # the container user reads it (0600): it must own it
        os.chown(token_file, host_uid, host_gid)
    if dry_run:
        if as_json:
            print_json({"argv": argv})
        else:
            click.echo(d.shell_command(argv))
        return
    from ..image import build as b

    b.require_engine()
    if b.docker("image", "inspect", image_ref, check=False).returncode != 0:
        raise ImageError(f"image {image_ref} is not built; run `capsule image build --flavor jupyter-ssh` "
                         "(or pass --image)")
    labels = b.image_labels(image_ref)
    if labels.get("io.torchcapsule.flavor") == "slim":
        raise ImageError(f"--image: {image_ref} is a slim image (no Jupyter or SSH); build and use the jupyter-ssh flavor")
    # Missing volumes would be made by dockerd, owned by root: make them, owned by the user.
    for v in d.VOLUMES:
        mkdir_owned(opts.volumes[v], host_uid, host_gid)
    mkdir_owned(home, host_uid, host_gid, mode=0o700)
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or ["?"])[-1]
        hint = "remove it with `docker rm -f " + name + "` or pass --name" if "already in use" in reason else \
            "see the message above"
        raise ImageError(f"docker run failed: {reason}; {hint}")
    info = d.connect_info(opts, token_file.read_text().strip(), spec.user, name)
    if as_json:
        print_json({"container": r.stdout.strip(), "argv": argv, **info})
        return
    con = console()
    con.print(f"[green]started[/] {name} from {image_ref}")
    if not owned:
        con.print(f"  [yellow]note[/]: the project is owned by root, so {spec.user} (uid {host_uid}) cannot write "
                  "the workspace; pass --uid/--gid of a non-root owner or chown the directories")
    con.print(f"  Jupyter: {info['jupyter_url']}")
    if "ssh" in info:
        con.print(f"  SSH:     {info['ssh']}" + ("" if pubkey else "  (no public key found: pass --key)"))
        con.print("  ~/.ssh/config entry:")
        for line in info["ssh_config"].splitlines():
            con.print(f"    {line}", markup=False)

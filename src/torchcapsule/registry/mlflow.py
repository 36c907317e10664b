"""The MLflow side of the registry: the only module of torchcapsule that imports mlflow.

Layout of what `register` stores (one MLflow run and one registered model version per call):
  run      params (meta.params, meta.kwargs), metrics (meta.metrics), tags (provenance)
  model    MLflow pyfunc "from code": pyfunc_model.py + artifacts/{model.safetensors, model.py,
           meta.json}; nothing pickled (see docs/registry.md)
  version  tags capsule.sha256.<file> (the checksums pull and serve verify), capsule.metric.<m>
           (so list/show/rules need no run lookups), capsule.git_commit, capsule.image_tag, capsule.image,
           capsule.lock_hash, capsule.torch, capsule.cuda, capsule.fingerprint, capsule.machine
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CapsuleError, IntegrityError, RegistryError
from . import checksums as cks
from . import facts as fx
from .modeldir import read_model_dir
from .rules import decide, parse_rule
from .store import artifact_root, is_remote, sqlite_path, tracking_uri, writer_lock
from .types import CODE, META, WEIGHTS, ModelVersion, PromotionDecision, parse_model_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ..config import Project

FORMAT = "torchcapsule/1"  # capsule.format tag: what download() knows how to read
_PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
_ARTIFACT_KEYS = {"weights": WEIGHTS, "model_code": CODE, "meta": META}  # pyfunc artifact -> file
_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"


# -- connecting ---------------------------------------------------------------------------------
def _where(uri: str) -> str:
    return "the tracking server at " + uri if is_remote(uri) else uri


def _probe(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of HTTP retries, when a server is down."""
    import urllib.error
    import urllib.request

    timeout = float(os.environ.get("CAPSULE_REGISTRY_PROBE_TIMEOUT", "5"))
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: a proxy or auth in front of it; let MLflow deal with the rest
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise RegistryError(
            f"cannot reach MLflow tracking server {uri} ({why}); start it (`mlflow server`) or fix "
            "registry.tracking_uri in capsule.yaml / $MLFLOW_TRACKING_URI"
        ) from None


def _client(uri: str) -> "MlflowClient":
    if is_remote(uri):
        # MLflow retries a dead server for minutes by default; the probe already answered.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # MLflow writes "View run at <url>" to stdout, which would break `--json` output
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        _probe(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    import mlflow
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):  # keep migrations' and registration's INFO lines off the CLI
        logging.getLogger(name).setLevel(logging.WARNING)

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with _errors(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _errors(uri: str, **ctx: str) -> Iterator[None]:
    """MLflow/SQLAlchemy/HTTP exceptions -> one-line RegistryError naming the store and the fix."""
    try:
        yield
    except CapsuleError:
        raise
    except Exception as e:  # noqa: BLE001 - translated below or re-raised as a bug
        from mlflow.exceptions import MlflowException

        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "database is locked" in text:
            raise RegistryError(f"{uri}: the SQLite store stayed locked by another writer; retry, "
                                "or use a tracking server for many concurrent writers") from None
        if isinstance(e, MlflowException) or type(e).__module__.startswith(("sqlalchemy", "requests", "urllib3")):
            raise RegistryError(f"{_where(uri)}: {text}; check registry.tracking_uri / $MLFLOW_TRACKING_URI") from None
        raise


def store_uri(*, project: "Project | None" = None, tracking_uri: str | None = None) -> str:
    """The tracking URI the other functions use for these arguments (names a store)."""
    return _uri_for(project, tracking_uri)


def _uri_for(project: "Project | None", tracking: str | None) -> str:
    if tracking:
        return tracking
    if project is None:
        from ..config import find_project_file, load_project

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                found = find_project_file()
            except CapsuleError:  # no capsule.yaml here: tracking_uri(None) says what to pass
                found = None
            project = load_project(found) if found else None  # a broken one is an error
    return tracking_uri(project)


# -- reading ------------------------------------------------------------------------------------
def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat() if ms else None


def _to_version(mv: Any) -> ModelVersion:
    tags = dict(mv.tags or {})
    metrics = {}
    for k, v in tags.items():
        if k.startswith("capsule.metric."):
            try:
                metrics[k[len("capsule.metric."):]] = float(v)
            except ValueError:
                pass
    params = {k[len("capsule.param."):]: v for k, v in tags.items() if k.startswith("capsule.param.")}
    return ModelVersion(
        name=mv.name, version=str(mv.version), aliases=tuple(sorted(mv.aliases or ())),
        metrics=metrics, params=params,
        tags={k: v for k, v in tags.items() if not k.startswith(("capsule.metric.", "capsule.param."))},
        source=mv.source or "", run_id=mv.run_id, created_at=_iso(mv.creation_timestamp),
    )


def _registered(client: "MlflowClient", uri: str, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    with _errors(uri):
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
    listing = f"registered: {', '.join(known)}" if known else "the registry is empty; run `capsule models register`"
    raise RegistryError(f"no model '{name}' in {_where(uri)}; {listing}")


def _resolve(client: "MlflowClient", uri: str, model_uri: str) -> ModelVersion:
    ref = parse_model_uri(model_uri)
    from mlflow.exceptions import MlflowException

    with _errors(uri):
        rm = _registered(client, uri, ref.name)
        aliases = dict(rm.aliases or {})
        if ref.alias:
            if ref.alias not in aliases:
                have = ", ".join(f"{a}->v{v}" for a, v in sorted(aliases.items())) or "none"
                raise RegistryError(
                    f"model '{ref.name}' has no alias '{ref.alias}' (aliases: {have}); set it with "
                    f"`capsule models promote {ref.name} VERSION --alias {ref.alias}`"
                )
            version = str(aliases[ref.alias])
        elif ref.version == "latest":
            versions = client.search_model_versions(f"name='{ref.name}'", max_results=1,
                                                    order_by=["version_number DESC"])
            if not versions:
                raise RegistryError(f"model '{ref.name}' has no versions; run `capsule models register`")
            version = str(versions[0].version)
        else:
            version = ref.version  # type: ignore[assignment]
        try:
            return _to_version(client.get_model_version(ref.name, version))
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        latest = client.search_model_versions(f"name='{ref.name}'", max_results=1,
                                              order_by=["version_number DESC"])
        top = f"versions 1-{latest[0].version}" if latest else "no versions"
        raise RegistryError(f"model '{ref.name}' has no version {version} ({top}); "
                            f"`capsule models list {ref.name}` shows them")


def resolve(uri: str, *, project: "Project | None" = None, tracking_uri: str | None = None) -> ModelVersion:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> ModelVersion (one-line error if unknown)."""
    store = _uri_for(project, tracking_uri)
    return _resolve(_client(store), store, uri)


def list_models(*, project: "Project | None" = None, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, latest version, aliases, description."""
    store = _uri_for(project, tracking_uri)
    db = sqlite_path(store)
    if db is not None and os.environ.get("CAPSULE_REGISTRY_FAST", "1") != "0":
        if not db.exists():
            return []  # no store yet: nothing registered, and no reason to create one to say so
        rows = _list_models_sqlite(db)
        if rows is not None:
            return rows
    client = _client(store)
    rows = []
    with _errors(store):
        for rm in client.search_registered_models(max_results=1000, order_by=["name ASC"]):
            latest = max((int(v.version) for v in rm.latest_versions or ()), default=None)
            rows.append({
                "name": rm.name, "latest_version": str(latest) if latest else None,
                "aliases": {a: str(v) for a, v in sorted((rm.aliases or {}).items())},
                "description": rm.description or "", "updated_at": _iso(rm.last_updated_timestamp),
            })
    return rows


# Alembic revisions of MLflow's schema whose registry tables _list_models_sqlite was checked
# against (tests/integration/test_registry_mlflow.py compares it with the MLflow client's answer).
# Any other revision, or any SQL error, falls back to the MLflow client.
# MLflow 3.18 (f4a9b2c7d1e6) adds skill-registry, issue and MCP tables after 3.17 (dc11669786a5)
# and leaves registered_models, model_versions and registered_model_aliases as they were.
KNOWN_SCHEMAS = frozenset({"dc11669786a5", "f4a9b2c7d1e6"})  # MLflow 3.17, 3.18


def _list_models_sqlite(db: Path) -> list[dict[str, Any]] | None:
    """`capsule models list` on an existing embedded store without importing mlflow (about 1.5 s
    of imports and store set-up saved): three read-only queries on MLflow's own tables."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return None
    try:
        rev = con.execute("SELECT version_num FROM alembic_version").fetchone()
        if not rev or rev[0] not in KNOWN_SCHEMAS:
            return None
        models = con.execute(
            "SELECT m.name, m.last_updated_time, m.description, "
            "(SELECT MAX(v.version) FROM model_versions v WHERE v.workspace = m.workspace "
            " AND v.name = m.name AND v.current_stage != 'Deleted_Internal') "
            "FROM registered_models m WHERE m.workspace = 'default' ORDER BY m.name").fetchall()
        aliases: dict[str, dict[str, str]] = {}
        for name, alias, version in con.execute(
                "SELECT name, alias, version FROM registered_model_aliases WHERE workspace = 'default' "
                "ORDER BY alias"):
            aliases.setdefault(name, {})[alias] = str(version)
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return [{"name": name, "latest_version": str(latest) if latest else None,
             "aliases": aliases.get(name, {}), "description": desc or "", "updated_at": _iso(updated)}
            for name, updated, desc, latest in models]


def list_versions(name: str, *, project: "Project | None" = None,
                  tracking_uri: str | None = None) -> list[ModelVersion]:
    store = _uri_for(project, tracking_uri)
    client = _client(store)
    with _errors(store):
        rm = _registered(client, store, name)
        found = client.search_model_versions(f"name='{name}'", max_results=10000,
                                             order_by=["version_number DESC"])
        # search results carry no aliases (MLflow fills them only on single-version reads)
        by_version: dict[str, list[str]] = {}
        for alias, v in (rm.aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        return [replace(_to_version(mv), aliases=tuple(sorted(by_version.get(str(mv.version), ()))))
                for mv in found]


# -- writing ------------------------------------------------------------------------------------
def default_model_dir(project: "Project") -> Path:
    return project.volume_path("models") / _model_name(project)


def _model_name(project: "Project") -> str:
    return project.registry.model_name or project.name


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}{k}": (v if isinstance(v, str) else json.dumps(v))[:5000] for k, v in d.items()}


def _experiment(client: "MlflowClient", name: str, artifact_location: str | None) -> str:
    """The project's experiment (named after it), created on first use; registrations and
    training runs (registry/tracking.py) share it."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created by a concurrent writer (remote servers take no file lock)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def register(project: "Project", model_dir: str | Path | None = None) -> ModelVersion:
    """Log the trained model directory as a new version of registry.model_name."""
    model_dir = Path(model_dir) if model_dir else default_model_dir(project)
    meta = read_model_dir(model_dir).meta
    digests = cks.digest_dir(model_dir)
    name = _model_name(project)
    # The machine that trained it: meta.json "machine" when the train stage recorded it (it may
    # have run on a GPU cluster), else this machine's facts, and the tag says which.
    recorded = meta.get("machine")
    machine = ({str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) and recorded
               else fx.machine_facts())
    machine.setdefault("torch", str(meta.get("torch", "unknown")))
    machine.setdefault("cuda", "unknown")
    provenance = {
        "capsule.format": FORMAT, "capsule.project": project.name,
        "capsule.git_commit": fx.git_commit(project.root), "capsule.image_tag": fx.image_tag(project),
        # The image the model was trained in, by digest when pushed: meta.json "image" when the
        # train stage recorded it, else where this registration runs.
        "capsule.image": str(meta.get("image") or fx.running_image()),
        "capsule.lock_hash": fx.lock_hash(project), "capsule.torch": machine["torch"],
        "capsule.cuda": machine["cuda"], "capsule.fingerprint": fx.fingerprint(machine),
        "capsule.machine": json.dumps(machine, sort_keys=True),
        "capsule.machine_source": "meta.json" if recorded else "probed at registration",
    }
    metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    params = {**_flat("", meta.get("params") or {}), **_flat("kwargs.", meta.get("kwargs") or {})}
    version_tags = {
        **provenance,
        **{f"capsule.sha256.{f}": d for f, d in digests.items()},
        **{f"capsule.metric.{k}": repr(v) for k, v in metrics.items()},
        **_flat("capsule.param.", params),
    }
    store = tracking_uri(project)
    # stdout belongs to the CLI's result (--json): whatever MLflow prints goes to stderr
    with writer_lock(store), _errors(store), contextlib.redirect_stdout(sys.stderr):
        client = _client(store)
        import mlflow

        exp_id = _experiment(client, project.name, artifact_root(project))
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{name}") as run:
            if params:
                mlflow.log_params(params)
            if metrics:
                mlflow.log_metrics(metrics)
            mlflow.set_tags({**provenance, **{f"capsule.sha256.{f}": d for f, d in digests.items()}})
            with warnings.catch_warnings():  # type-hint and input-example advice: not ours to act on
                warnings.simplefilter("ignore", UserWarning)
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(_PYFUNC_FILE),
                    artifacts={key: str(model_dir / f) for key, f in _ARTIFACT_KEYS.items()},
                    pip_requirements=_requirements(machine["torch"]),
                    signature=_signature(meta),
                )
        training = _training_run(client, project, store)
        if training:  # the version's source run is the training: the UI shows its curve
            version_tags["capsule.training_run"] = training
            client.set_tag(run.info.run_id, "capsule.training_run", training)
        mv = _new_version(client, name, info, training or run.info.run_id, version_tags)
        if training:
            client.set_tag(training, "capsule.registered_version", f"{name}/{mv.version}")
        return _to_version(client.get_model_version(name, str(mv.version)))


def _training_run(client: "MlflowClient", project: "Project", store: str) -> str | None:
    """The MLflow run of the latest training logged in the logs volume, its pending metrics sent
    first (they may have waited for a store that was down); None when there is none."""
    from . import tracking

    logs = sorted(project.volume_path("logs").glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    latest = logs[-1]
    try:  # the caller holds the store lock already
        run_id = tracking.sync(latest, store, artifact_location=artifact_root(project), store_lock=False).run_id
    except CapsuleError as e:
        print(f"note: {latest}: its metrics were not sent ({e}); the version has no training run",
              file=sys.stderr)
        return None
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:  # a run of another store (the state file came from elsewhere)
        return None
    return run_id


def _new_version(client: "MlflowClient", name: str, info: Any, run_id: str, tags: dict[str, str]) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="registered by torchcapsule")
    except MlflowException as e:  # it exists (or a concurrent writer on a server made it first)
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name=name, source=info.model_uri, run_id=run_id,
                                       tags=tags, model_id=info.model_id)


def _requirements(torch_version: str) -> list[str]:
    import mlflow
    import numpy

    # Pinned explicitly: MLflow's inference of requirements would import and run the model.
    return [f"mlflow=={mlflow.__version__}", f"torch=={torch_version.split('+')[0]}",
            f"numpy=={numpy.__version__}"]


def _signature(meta: dict[str, Any]) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = tuple(int(n) for n in meta.get("input_shape") or ())
    if not shape:
        return None
    n_out = len(meta.get("labels") or ()) or -1
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(meta.get("input_dtype", "float32")), (-1, *shape))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, n_out))]),
    )


def promote(name: str, version: str | int, alias: str, *, project: "Project | None" = None,
            tracking_uri: str | None = None) -> ModelVersion:
    """Point ALIAS at VERSION (replaces where it pointed before)."""
    store = _uri_for(project, tracking_uri)
    client = _client(store)
    mv = _resolve(client, store, f"models:/{name}/{version}")
    with _errors(store):
        client.set_registered_model_alias(name, alias, mv.version)
        return _to_version(client.get_model_version(name, mv.version))


def apply_rule(project: "Project", version: str | int) -> PromotionDecision:
    """Promote VERSION to registry.promote.alias when registry.promote.rule holds; say why not."""
    name, alias, rule_text = _model_name(project), project.registry.promote.alias, project.registry.promote.rule
    rule = parse_rule(rule_text) if rule_text else None  # a bad rule fails before any change
    store = tracking_uri(project)
    client = _client(store)
    mv = _resolve(client, store, f"models:/{name}/{version}")
    if alias in mv.aliases:
        return PromotionDecision(True, f"version {mv.version} already is {alias}", alias, mv.version)
    with _errors(store):
        aliases = dict(_registered(client, store, name).aliases or {})
        refs = {}
        for ref in (rule.aliases if rule else ()):
            refs[ref] = (_to_version(client.get_model_version(name, str(aliases[ref]))).metrics
                         if ref in aliases else None)
    ok, why = decide(rule_text, mv.metrics, refs)
    if not ok:
        return PromotionDecision(False, f"{name} version {mv.version} not promoted to {alias}: {why}",
                                 alias, mv.version)
    promote(name, mv.version, alias, tracking_uri=store)
    return PromotionDecision(True, f"{name} version {mv.version} promoted to {alias}: {why}", alias, mv.version)


# -- pulling ------------------------------------------------------------------------------------
def _pyfunc_layout(root: Path, origin: str) -> dict[str, Path]:
    """Where the model files lie in a downloaded MLflow model; refuse anything but our format."""
    import yaml

    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise IntegrityError(f"{origin}: no MLmodel file; it was not logged by `capsule models register`")
    conf = yaml.safe_load(mlmodel.read_text()) or {}
    pyfunc = (conf.get("flavors") or {}).get("python_function") or {}
    if pyfunc.get("loader_module") != _CODE_LOADER or "python_model" in pyfunc:
        raise IntegrityError(
            f"{origin}: not a torchcapsule model (its loader is {pyfunc.get('loader_module')!r}, which "
            "unpickles a python_model); refused without loading; register it with `capsule models register`"
        )
    arts = pyfunc.get("artifacts") or {}
    out = {}
    for key, fname in _ARTIFACT_KEYS.items():
        rel = (arts.get(key) or {}).get("path")
        if not rel:
            raise IntegrityError(f"{origin}: the model lacks its '{key}' artifact ({fname}); register it again")
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise IntegrityError(f"{origin}: artifact path {rel!r} leaves the model directory; refused")
        out[fname] = path
    return out


def download(uri: str, dest: str | Path, *, project: "Project | None" = None,
             tracking_uri: str | None = None, force: bool = False) -> Path:
    """Fetch a version into DEST as a model directory (model.safetensors, model.py, meta.json,
    checksums.sha256), every file checked against the sha256 recorded at registration.
    DEST must be new or empty (`force`: a model directory, whose stale weights are removed).
    Files are staged beside DEST and moved in only after all verified: nothing is unpickled,
    and a mismatch, a pickled entry or any failure leaves DEST as it was (not even created)."""
    dest = Path(dest)
    stale = cks.check_destination(dest, force=force)  # before any registry call
    store = _uri_for(project, tracking_uri)
    client = _client(store)
    mv = _resolve(client, store, uri)
    origin = f"models:/{mv.name}/{mv.version}"
    if mv.tags.get("capsule.format") != FORMAT or not mv.checksums:
        raise IntegrityError(f"{origin}: not registered by torchcapsule (no recorded checksums); "
                             "refused without loading; register the model with `capsule models register`")
    import mlflow

    anchor = next(p for p in (dest.absolute(), *dest.absolute().parents) if p.is_dir())
    try:
        staging = tempfile.TemporaryDirectory(prefix=f".{dest.name or 'model'}.pull-", dir=anchor)
    except OSError as e:
        raise RegistryError(f"{dest}: cannot write there ({e.strerror or e} in {anchor}); "
                            "pass -o with a writable directory") from None
    with staging as tmp, _errors(store):
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=origin, dst_path=str(Path(tmp) / "m")))
        layout = _pyfunc_layout(root, origin)
        stage = Path(tmp).resolve() / "stage"
        stage.mkdir()
        for fname, path in layout.items():
            shutil.copyfile(path, stage / fname)
        try:  # the same checks as register's; messages name the registry's file, not the staging one
            cks.verify(stage, mv.checksums)
            read_model_dir(stage)
        except RegistryError as e:  # IntegrityError stays one
            raise type(e)(e.message.replace(str(stage), origin), hint=e.hint) from None
        cks.write_checksums(stage, mv.checksums)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for f in stale:
                f.unlink()
            for f in stage.iterdir():  # only after everything verified: DEST never holds a bad file
                os.replace(f, dest / f.name)
        except OSError as e:
            raise RegistryError(f"{dest}: cannot write the model there ({e.strerror or e}); "
                                "pass -o with a writable directory") from None
    return dest

"""capsule.yaml against a hostile author (issue 14): alias bombs, values that would inject lines
into generated files (sbatch script, Airflow DAG), values that used to raise tracebacks, and
volumes/workdirs that reach outside the project."""
from __future__ import annotations

import ast
import subprocess
import time

import pytest

from torchcapsule.config import MAX_ECHO, MAX_YAML_NODES, load_project, parse_project
from torchcapsule.errors import ConfigError
from torchcapsule.launch.slurm import render_script
from torchcapsule.launch.spec import job_spec
from torchcapsule.pipeline.exports import airflow

from ..conftest import run_capsule


def _bomb(depth: int, width: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(width))}]")
    return "\n".join(lines)


def _refused(text: str, file: str = "f.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_project(text, file)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# -- item 5: alias bombs and echoed values ---------------------------------------------------------
@pytest.mark.parametrize("use", ["image: {flavor: *a8}", "targets: {kubernetes: {affinity: {k: *a8}}}"])
def test_alias_bomb_is_refused_before_it_is_expanded(use):
    t0 = time.process_time()
    msg = _refused(_bomb(8) + "\nname: x\n" + use + "\n")  # 9**9 = 387 million values expanded
    assert time.process_time() - t0 < 5  # CPU seconds; it used to take minutes
    assert "aliases" in msg and str(MAX_YAML_NODES) in msg


def test_modest_aliases_still_work():
    text = "name: x\nstages:\n  a: {run: x, env: &env {A: '1', B: '2'}}\n  b: {run: y, env: *env}\n"
    assert parse_project(text, "f.yaml").stages["b"].env == {"A": "1", "B": "2"}


def test_echoed_value_is_capped():
    msg = _refused("name: x\nimage: {flavor: '" + "A" * 100_000 + "'}\n")
    assert "image.flavor" in msg and len(msg) < 4 * MAX_ECHO + 200
    msg = _refused("name: x\nimage: {flavor: [" + ", ".join(["[1, 2, 3, 4, 5, 6]"] * 5000) + "]}\n")
    assert len(msg) < 4 * MAX_ECHO + 200


# -- item 9: values that reach generated files ------------------------------------------------------
STAGE = "name: x\nstages:\n  t:\n    run: python t.py\n"


def test_env_key_must_be_a_variable_name():
    msg = _refused(STAGE + "    env: {'X=1; touch /tmp/P; Y': v}\n")
    assert "stages.t.env" in msg and "not a variable name" in msg
    assert parse_project(STAGE + "    env: {_OK_1: 'v; touch /tmp/P'}\n", "f.yaml").stages["t"].env


def test_env_values_are_quoted_in_the_sbatch_script(tmp_path):
    (tmp_path / "capsule.yaml").write_text(STAGE + "    env: {X: \"1; touch /tmp/P\\n#SBATCH --wrap=id\"}\n")
    project = load_project(tmp_path / "capsule.yaml")
    script = render_script(job_spec(project, "t"), project.targets.slurm, python="/usr/bin/python3")
    head = []  # what sbatch reads as directives: lines up to the first command
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        head.append(line)
    assert head and not any("--wrap" in line for line in head)
    f = tmp_path / "job.sbatch"
    f.write_text(script)
    assert subprocess.run(["bash", "-n", str(f)], capture_output=True).returncode == 0
    # the value reaches the job byte for byte, as data
    exports = script[:script.index('echo "torchcapsule:')]  # the environment part, run for real
    r = subprocess.run(["bash", "-c", exports + '\nprintf %s "$X"'], capture_output=True, text=True)
    assert r.stdout == "1; touch /tmp/P\n#SBATCH --wrap=id"


def test_stage_name_with_a_trailing_newline_is_refused():
    msg = _refused("name: x\nstages:\n  \"evil\\n\": {run: x}\n")
    assert "stage name" in msg and "'evil\\n'" in msg


@pytest.mark.parametrize("field", ["partition", "account", "qos", "time", "constraint"])
def test_slurm_directive_values_stay_on_one_line(field):
    msg = _refused(f"name: x\ntargets:\n  slurm: {{{field}: \"a\\n#SBATCH --wrap=touch /tmp/P\"}}\n")
    # time is parsed into a duration, so a newline is refused as "not a duration"
    assert f"targets.slurm.{field}" in msg and ("not a duration" if field == "time" else "newline") in msg


def test_extra_directives_stay_on_one_line():
    msg = _refused("name: x\ntargets:\n  slurm: {extra_directives: [\"--mail-type=END\\n--wrap=id\"]}\n")
    assert "targets.slurm.extra_directives" in msg


@pytest.mark.parametrize("tz", ["Mars/Olympus", 'UTC"""\nimport os; os.system("id")\n"""', "../../etc/passwd", ""])
def test_timezone_must_be_in_the_tz_database(tz):
    text = "name: x\nschedule: {cron: '@daily', timezone: %s}\n" % repr(tz).replace("'", '"') \
        if "\n" not in tz else "name: x\nschedule:\n  cron: '@daily'\n  timezone: " + \
        '"' + tz.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"\n'
    msg = _refused(text)
    assert "schedule.timezone" in msg and "tz database" in msg


def test_timezone_reaches_the_dag_as_a_valid_python_file(tmp_path):
    p = parse_project("name: x\nstages: {t: {run: x}}\nschedule: {cron: '@daily', timezone: America/New_York}\n",
                      tmp_path / "capsule.yaml")
    src = airflow.text(p)
    ast.parse(src)  # still one module: nothing broke out of its docstring or strings
    assert "tz='America/New_York'" in src


# -- item 10: tracebacks that became one-line errors -----------------------------------------------
def test_binary_capsule_yaml_is_one_line(tmp_path):
    f = tmp_path / "capsule.yaml"
    f.write_bytes(b"name: x\n\xff\xfe\x00\x01garbage")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_project(f)
    r = run_capsule("validate", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "not UTF-8" in r.stderr


@pytest.mark.parametrize("rule", ["accuracy >= " + " + ".join(["accuracy"] * 3000),
                                  "not " * 50_000 + "accuracy > 1",
                                  "accuracy >= " + "-" * 100 + "1"])
def test_huge_promotion_rules_are_one_line_errors(rule):
    msg = _refused(f"name: x\nregistry:\n  promote: {{rule: '{rule}'}}\n")
    assert "registry.promote.rule" in msg and ("limit" in msg or "deep" in msg)
    assert len(msg) < 1000


@pytest.mark.parametrize("gpus", ["H100:99999999999999999999", "99999999999999999999", 99999999999999999999])
def test_absurd_gpu_counts_are_refused(gpus):
    val = gpus if isinstance(gpus, int) else f"'{gpus}'"
    msg = _refused(f"name: x\nstages:\n  t:\n    run: a\n    resources: {{gpus: {val}}}\n")
    assert "stages.t.resources.gpus" in msg and "1024" in msg


# -- item 11: volumes and workdirs outside the project ---------------------------------------------
@pytest.mark.parametrize("vol,value", [("workspace", "/"), ("data", "/etc"), ("models", "../../../../../../usr/lib"),
                                       ("logs", "/proc/self")])
def test_system_volumes_need_an_explicit_opt_in(tmp_path, vol, value):
    text = f"name: x\nvolumes: {{{vol}: '{value}'}}\n"
    msg = _refused(text, tmp_path / "capsule.yaml")
    assert f"volumes.{vol}" in msg and "allow_system_paths" in msg
    opted = parse_project(f"name: x\nvolumes: {{{vol}: '{value}', allow_system_paths: true}}\n",
                          tmp_path / "capsule.yaml")
    assert opted.volumes.allow_system_paths


def test_workdir_escaping_the_project_needs_an_opt_in(tmp_path):
    msg = _refused(STAGE + "    workdir: ../../../../etc\n", tmp_path / "capsule.yaml")
    assert "stages.t.workdir" in msg and "outside the project" in msg
    assert parse_project(STAGE + "    workdir: sub/dir\n", tmp_path / "capsule.yaml").stages["t"].workdir
    assert parse_project("name: x\nvolumes: {allow_system_paths: true}\nstages:\n  t:\n    run: a\n"
                         "    workdir: ../../../../etc\n", tmp_path / "capsule.yaml")

"""A process killed (SIGKILL) in the middle of a checkpoint save leaves the previous one loadable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import torchcapsule.train.checkpoint as ck

    directory, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    c = ck.Checkpointer(directory, model=model, optimizer=opt)
    if mode == "crash":
        c.save(10)
        torch.save(model.state_dict(), os.path.join(directory, "expected.pt"))
        with torch.no_grad():
            model.weight.add_(1.0)
        real_save = torch.save
        def dying_save(obj, f, *a, **k):  # the model file is already written: die half way
            real_save(obj, f, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = dying_save
        c.save(20)
        print("not reached")
    else:
        got = c.resume()
        expected = torch.load(os.path.join(directory, "expected.pt"), weights_only=True)
        assert got["step"] == 10, got
        assert torch.equal(model.weight, expected["weight"]), "weights are not the step-10 ones"
        c.save(30)  # the next save also clears the dead save's temporary directory
        print("ok", sorted(os.listdir(directory)))
""")


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ckdir = tmp_path / "ck"
    r = subprocess.run([sys.executable, str(script), str(ckdir), "crash"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    names = sorted(p.name for p in ckdir.iterdir())
    assert "ckpt-000000010" in names and "ckpt-000000020" not in names
    assert any(n.startswith(".tmp-ckpt-000000020") for n in names)  # the half-written save

    r = subprocess.run([sys.executable, str(script), str(ckdir), "load"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ckpt-000000030" in r.stdout and ".tmp-ckpt" not in r.stdout

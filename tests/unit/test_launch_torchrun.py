"""launch/torchrun.py: which rank exit codes stop torchrun's restarts, what the launcher exits with
(pure), and the torch internals the hook relies on (these fail loudly when a torch upgrade moves them)."""
from __future__ import annotations

import inspect
import signal

import pytest

from torchcapsule.launch import torchrun
from torchcapsule.launch.failure import PREEMPTED_EXIT_CODE, ended_state
from torchcapsule.launch.api import JobState


@pytest.mark.parametrize("codes,stop", [
    ([75], True),
    ([75, -15], True),  # the rank that saved, and the one the agent then stopped
    ([-15, 75], True),
    ([1], False),  # a broken rank: restart it (--max_restarts)
    ([-9], False),  # a killed rank: restart it
    ([3, -15], False),
    ([], False),
    ([None], False),
])
def test_only_a_rank_that_saved_stops_the_restarts(codes, stop):
    assert torchrun.stops_restarts(codes) is stop


@pytest.mark.parametrize("codes,signum,code", [
    ([75, 75], signal.SIGTERM, 75),  # cancelled or preempted with a checkpoint
    ([75, -15], None, 75),  # SIGTERM to the ranks only: preempted, not a failure
    ([-15, -15], signal.SIGTERM, 143),  # ranks that don't checkpoint: stopped like any command
    ([], signal.SIGINT, 130),  # Ctrl-C before the ranks started
    ([None, None], signal.SIGTERM, 143),  # still stopping when a second signal came
    ([7, -15], None, 1),  # a failed group: torchrun's 1 (the summary names the rank's 7)
    ([-9], None, 1),
])
def test_exit_code(codes, signum, code):
    assert torchrun.exit_code(codes, signum) == code


def test_the_preempted_exit_is_cancelled_and_the_others_are_not():
    assert PREEMPTED_EXIT_CODE == 75
    assert ended_state(torchrun.exit_code([75], signal.SIGTERM)) is JobState.CANCELLED
    assert ended_state(torchrun.exit_code([3])) is JobState.FAILED


# -- the torch internals the hook relies on: if one of these fails, torch moved them; adapt the hook
def test_launch_agent_builds_the_module_level_local_elastic_agent():
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    assert launcher_api.LocalElasticAgent is LocalElasticAgent or issubclass(
        launcher_api.LocalElasticAgent, LocalElasticAgent)
    # the name is looked up at call time in the module, so install() replacing it takes effect
    assert "agent = LocalElasticAgent(" in inspect.getsource(launcher_api.launch_agent)
    assert "raise ChildFailedError(" in inspect.getsource(launcher_api.launch_agent)


def test_the_run_loop_restarts_only_while_remaining_restarts_and_asks_monitor_workers():
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    loop = inspect.getsource(SimpleElasticAgent._invoke_run)
    assert "run_result = self._monitor_workers(self._worker_group)" in loop
    assert "if self._remaining_restarts > 0:" in loop
    assert "self._restart_workers(self._worker_group)" in loop
    assert "self._remaining_restarts = self._worker_group.spec.max_restarts" in inspect.getsource(
        SimpleElasticAgent.__init__)
    run = inspect.getsource(SimpleElasticAgent.run)
    assert "except SignalException" in run and "self._shutdown(e.sigval" in run


def test_the_agent_hooks_have_the_signatures_the_subclass_overrides():
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    assert list(inspect.signature(LocalElasticAgent._monitor_workers).parameters) == ["self", "worker_group"]
    assert list(inspect.signature(LocalElasticAgent._shutdown).parameters) == ["self", "death_sig", "timeout"]
    assert "self.subprocess_handlers" in inspect.getsource(SubprocessContext.__init__)
    assert "self._pcontext.close(death_sig, timeout)" in inspect.getsource(LocalElasticAgent._shutdown)


def test_the_exceptions_carry_what_the_launcher_reads():
    from torch.distributed.elastic.multiprocessing import ProcessFailure, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    e = SignalException("got 15", sigval=signal.SIGTERM)
    assert e.sigval == signal.SIGTERM
    failure = ProcessFailure(local_rank=1, pid=42, exitcode=75, error_file="<N/A>")
    err = ChildFailedError(name="train.py", failures={1: failure})
    assert err.failures[1].exitcode == 75
    assert "exitcode  : 75" in str(err) and "rank      : 1" in str(err)  # what failure.py parses


def test_install_puts_the_preemption_agent_where_launch_agent_finds_it(monkeypatch):
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monkeypatch.setattr(launcher_api, "LocalElasticAgent", LocalElasticAgent)  # restored afterwards
    agent = torchrun.install()
    assert launcher_api.LocalElasticAgent is agent and issubclass(agent, LocalElasticAgent)
    assert agent._monitor_workers is not LocalElasticAgent._monitor_workers

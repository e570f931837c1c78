"""The task registry (workbench.tasks.registry): one lookup, one error for a bad name or option."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.errors import TaskBuildError
from workbench.tasks import IOI, Needle, get_task, task_names
from workbench.tasks.toy import BigramBackcopy
from workbench.toys import TOY_NAMES


def test_every_kind_is_registered():
    assert task_names("toy") == sorted(TOY_NAMES)
    assert task_names("templated") == ["colored-objects", "ioi", "ioi-toy"]
    assert {"ioi", "ioi-toy", "colored-objects", "needle", "loss", "toy", "next-token"} == set(
        task_names("metric")
    )
    assert set(task_names()) == {*task_names("metric"), *task_names("toy")}


def test_names_build_their_tasks_with_options():
    needle = get_task("needle", length=256, depths=[0.5])
    assert isinstance(needle, Needle) and needle.length == 256
    assert get_task("ioi", kind="templated", n=8) == IOI(n=8)
    toy = get_task("ioi-toy", n=8)
    assert toy == IOI(n=8, toy=True) and toy.templated.name == "ioi-toy"
    assert isinstance(get_task("toy-bb", kind="toy"), BigramBackcopy)
    assert get_task("toy", model_name="toy-bb").model_name == "toy-bb"


def test_unknown_task_and_unknown_option_raise_the_one_error():
    with pytest.raises(TaskBuildError, match="unknown task 'squad'; tasks: colored-objects"):
        get_task("squad")
    with pytest.raises(TaskBuildError, match="task 'ioi' has no option 'lenght'"):
        get_task("ioi", lenght=3)
    with pytest.raises(TaskBuildError, match="task 'toy-bb' has no option 'n'"):
        get_task("toy-bb", n=3)


def test_bad_options_are_errors_not_ignored():
    with pytest.raises(TaskBuildError, match="length='4096' should be int"):
        get_task("needle", length="4096")
    with pytest.raises(TaskBuildError, match="depths=0.5 should be a list of float"):
        get_task("needle", depths=0.5)
    with pytest.raises(TaskBuildError, match="toy=1 should be bool"):
        get_task("ioi", toy=1)
    with pytest.raises(TaskBuildError, match="needs option"):
        get_task("next-token")
    with pytest.raises(TaskBuildError, match="fixes toy"):
        get_task("ioi-toy", toy=False)


def test_a_kind_refuses_the_other_kinds():
    with pytest.raises(TaskBuildError, match="unknown metric task 'toy-bb'"):
        get_task("toy-bb", kind="metric")
    with pytest.raises(TaskBuildError, match="unknown templated task 'needle'"):
        get_task("needle", kind="templated")
    with pytest.raises(TaskBuildError, match="unknown toy task 'smollm2-135m'"):
        get_task("toy", model_name="smollm2-135m").batches(None, 4)
    with pytest.raises(TaskBuildError, match="unknown task kind"):
        get_task("ioi", kind="metrics")


@given(st.one_of(st.text(), st.integers(), st.none()))
def test_any_name_not_in_the_registry_is_refused(name):
    if name in task_names():
        return
    with pytest.raises(TaskBuildError, match="unknown task"):
        get_task(name)


@given(st.sampled_from(task_names()), st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True))
def test_any_option_a_task_does_not_take_is_refused(name, option):
    key = f"x_{option}"  # no task has an option starting with x_
    with pytest.raises(TaskBuildError, match=f"task '{name}' has no option '{key}'"):
        get_task(name, **{key: 1})

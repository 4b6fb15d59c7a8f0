"""moelora.switches: the thread-local blocks over their environment variables."""

import threading

import pytest

import moelora
from moelora import switches


@pytest.mark.parametrize("value, expected", [("0", False), ("false", False), ("FALSE", False), ("no", False),
                                             ("Off", False), (" 0 ", False), ("1", True), ("true", True),
                                             ("YES", True), ("on", True)])
def test_boolean_variables_read_the_usual_words(monkeypatch, value, expected):
    monkeypatch.setenv("MOELORA_FORCE_FALLBACK", value)
    monkeypatch.setenv("MOELORA_VALIDATE", value)
    assert switches.fallback_forced() is expected
    assert switches.validation_enabled() is expected


def test_boolean_variables_unset_or_empty_take_their_default(monkeypatch):
    monkeypatch.setenv("MOELORA_FORCE_FALLBACK", "")
    monkeypatch.delenv("MOELORA_VALIDATE", raising=False)
    assert switches.fallback_forced() is False and switches.validation_enabled() is True


@pytest.mark.parametrize("name, reader", [("MOELORA_FORCE_FALLBACK", switches.fallback_forced),
                                          ("MOELORA_VALIDATE", switches.validation_enabled)])
def test_boolean_variable_with_another_value_raises_naming_it(monkeypatch, name, reader):
    monkeypatch.setenv(name, "disabled")
    with pytest.raises(ValueError, match=f"{name} must be one of .* got 'disabled'"):
        reader()


def test_backend_variable_reads_any_case_and_spaces(monkeypatch):
    monkeypatch.setenv("MOELORA_BACKEND", " Torch ")
    assert switches.current_backend() == "torch"
    monkeypatch.setenv("MOELORA_BACKEND", "TRITON")
    assert switches.current_backend() == "triton"


@pytest.mark.parametrize("value", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_backend_variable_unset_or_blank_reads_auto(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MOELORA_BACKEND", value)
    assert switches.current_backend() == "auto"
    with moelora.use_backend("torch"):
        assert switches.current_backend() == "torch"


@pytest.mark.parametrize("block, read", [(moelora.validation, switches.validation_enabled),
                                         (switches.force_fallback, switches.fallback_forced)])
@pytest.mark.parametrize("environment", ["0", "1"])
def test_a_block_wins_over_the_environment_and_reads_as_a_bool(monkeypatch, block, read, environment):
    """Either value of a block, given as a bool or as 0/1, is what the switch reads (a bool) inside it, whatever
    the environment variable says; after the block the variable is read again."""
    name = "MOELORA_VALIDATE" if read is switches.validation_enabled else "MOELORA_FORCE_FALLBACK"
    monkeypatch.setenv(name, environment)
    for value in (False, True, 0, 1):
        with block(value):
            assert read() is bool(value)
    assert read() is (environment == "1")


def test_force_fallback_without_an_argument_forces_the_fallbacks(monkeypatch):
    monkeypatch.delenv("MOELORA_FORCE_FALLBACK", raising=False)
    with switches.force_fallback():
        assert switches.fallback_forced() is True


@pytest.mark.parametrize("switch", [moelora.validation, switches.force_fallback])
@pytest.mark.parametrize("value", ["off", "0", None, 2.0, 2, -1, 0.0, 1.0])
def test_switch_refuses_what_is_not_a_bool(switch, value):
    """Not even a float equal to 0 or 1: the argument is a flag, not a number."""
    with pytest.raises(TypeError, match=r"\(enabled\) must be a bool"):
        switch(value)


@pytest.mark.parametrize("block, read, values", [
    (moelora.use_backend, switches.current_backend, ("torch", "triton")),
    (moelora.validation, switches.validation_enabled, (False, True)),
    (switches.force_fallback, switches.fallback_forced, (True, False)),
])
def test_blocks_nest_restore_on_exceptions_and_stay_in_their_thread(monkeypatch, block, read, values):
    for name in ("MOELORA_BACKEND", "MOELORA_VALIDATE", "MOELORA_FORCE_FALLBACK"):
        monkeypatch.delenv(name, raising=False)
    outside = read()
    outer, inner = values
    with block(outer):
        assert read() == outer
        with pytest.raises(KeyError):
            with block(inner):
                assert read() == inner
                raise KeyError("inside")
        assert read() == outer  # the inner block's value is gone after its exception
        seen = []
        thread = threading.Thread(target=lambda: seen.append(read()))
        thread.start()
        thread.join()
        assert seen == [outside]  # another thread reads the environment, not this block
    assert read() == outside

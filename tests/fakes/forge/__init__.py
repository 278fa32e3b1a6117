"""A fake of the current Forge (``backend/``) surface the K-LoRA Forge adapter touches.

Faithful to ``shared/docs/research/forge-internals.md`` §1 and §4 (patch identifiers, shallow ``clone``, the
identifier-keyed ``LoraLoader`` merge cache with backups, online slots, ``sampling_prepare`` loading a new clone,
``process_before_every_sampling`` called twice for hires, ``denoiser.step/total_steps``), with real torch layers.
``host.py`` holds the fake; ``fixture.py`` the pytest fixture that installs it into ``sys.modules``.
"""

try:  # assertion messages inside the shared checks (fixture.py) when it is imported by test modules
    import pytest

    pytest.register_assert_rewrite("tests.fakes.forge.fixture")
except ImportError:  # benchmarks import the fake without pytest
    pass

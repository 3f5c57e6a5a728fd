"""The CPU flags Tessera adds to XLA_FLAGS, and how a user keeps control of them."""

from runtime.xla_cpu_flags import apply_cpu_flags


def test_adds_onednn_beside_the_users_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("TESSERA_XLA_CPU_DEFAULTS", raising=False)
    apply_cpu_flags()
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_use_onednn=true"


def test_a_users_own_setting_and_the_opt_out_win(monkeypatch):
    import os

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    apply_cpu_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=false"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("TESSERA_XLA_CPU_DEFAULTS", "0")
    apply_cpu_flags()
    assert os.environ["XLA_FLAGS"] == ""

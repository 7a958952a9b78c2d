"""Device catalog, memory arithmetic and the budget/devices CLI."""
from __future__ import annotations

import pytest

from edge_mla import budget as bud
from edge_mla import cli


def test_catalog_entries_are_valid_and_sourced():
    devices = bud.load_devices()
    for key in ("rpi5", "rpi5-4gb", "rpi4-4gb", "rpi-zero-2w", "jetson-orin-nano", "iphone-15-pro", "android-8gb",
                "laptop-16gb", "esp32-s3"):
        assert key in devices
    for d in devices.values():
        assert d.name and d.cpu and len(d.source) > 30, d.key
        assert 0 < d.usable_mb < d.ram_mb and d.bandwidth_gbs > 0
        assert set(d.runtimes) <= {"llama.cpp", "onnxruntime"}
    assert bud.find_device("rpi5", devices).ram_mb == 8000  # rpi5 means the 8 GB one
    assert devices["esp32-s3"].runtimes == []


def test_unknown_device_suggests_names():
    with pytest.raises(ValueError, match="did you mean rpi5"):
        bud.find_device("rpi-5", bud.load_devices())


def test_user_device_file(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[board]\nname = "My board"\nram_mb = 2000\nusable_mb = 1500\nbandwidth_gbs = 8.0\ncpu = "A55"\n'
                 'runtimes = ["llama.cpp"]\nsource = "measured on my desk with free -m and mbw"\n')
    devices = bud.load_devices(f)
    assert devices["board"].usable_mb == 1500 and "rpi5" in devices
    f.write_text('[broken]\nname = "x"\n')
    with pytest.raises(ValueError, match="every entry needs"):
        bud.load_devices(f)


def test_memory_arithmetic():
    device = bud.Device("d", "D", 1000, 500, 10.0, "cpu", ["llama.cpp"], "test")
    fp = bud.Footprint("m", "llama.cpp", "mla", weights_bytes=100 * bud.MB, kv_bytes_per_token=10_000,
                       max_context=100_000)
    base, work = bud.RUNTIME_BASE_BYTES["llama.cpp"], bud.RUNTIME_BYTES_PER_TOKEN["llama.cpp"]
    b = bud.budget(fp, device, 1000)
    assert b.memory_mb == pytest.approx((base + 100 * bud.MB + 1000 * (10_000 + work)) / bud.MB)
    assert b.fits
    # the longest context exactly exhausts the usable memory
    assert b.max_context == int((500 * bud.MB - base - 100 * bud.MB) // (10_000 + work))
    assert bud.budget(fp, device, b.max_context).fits and not bud.budget(fp, device, b.max_context + 1).fits
    assert b.decode_tokens_per_s_bound == pytest.approx(10e9 / (100 * bud.MB + 10_000 * 1000))
    with pytest.raises(ValueError, match="beyond"):
        bud.budget(fp, device, 200_000)


def test_original_estimate_has_the_real_cache_width():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      num_hidden_layers=30, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    fp = bud.footprint_estimate(cfg, 16, 2.0, "llama.cpp")
    assert fp.kv_bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert abs(fp.weights_bytes / 2 - 134.5e6) < 1e6  # SmolLM2-135M's parameter count


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["budget", "x.gguf", "--device", "nope"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert cli.main(["budget", str(tmp_path / "missing.gguf"), "--device", "rpi5"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 10)
    assert cli.main(["budget", str(bad), "--device", "rpi5"]) == 2
    assert "not a GGUF" in capsys.readouterr().err
    assert cli.main(["build", "--device", "esp32-s3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no LLM fits" in err and not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    assert cli.main(["build", "--device", "rpi5", "--out", str(tmp_path / "exists")]) == 2
    assert "--force" in capsys.readouterr().err


def test_devices_command_lists_sources(capsys):
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "Raspberry Pi Zero 2 W" in out and "source:" in out and "no LLM fits" in out

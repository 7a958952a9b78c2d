"""What a newcomer meets first: missing packages named with the command that installs them, a llama.cpp crash
reported instead of killing the process, Llama models with attention biases, and a CLI with help, defaults,
a version and exit codes."""
from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import types

import pytest
import torch

from conftest import prompt, stats_for, tiny_model
from edge_mla import cli, commands
from edge_mla.convert import Plan, convert
from edge_mla.runtimes import llamacpp
from edge_mla.source import MissingDependency, load_source
from conftest import word_tokenizer


def test_missing_package_is_named_with_the_install_command(tmp_path, monkeypatch, capsys):
    import transformers

    def needs_accelerate(*args, **kwargs):  # what transformers 5.24 raises without accelerate
        raise ValueError("Using a `device_map` or loading a GGUF file requires accelerate: pip install accelerate")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", needs_accelerate)
    from edge_mla import source
    monkeypatch.setattr(source, "check_gguf_source", lambda path: None)  # the header's checks pass: the load fails
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(MissingDependency, match="'accelerate'.*pip install accelerate"):
        load_source(str(model))
    assert cli.main(["convert", "-m", str(model), "-o", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "pip install accelerate" in err and "not a GGUF" not in err and "Traceback" not in err


def _die_like_an_illegal_instruction():
    os.kill(os.getpid(), signal.SIGILL)


def _fail_inside():
    raise ValueError("a clear problem")


def test_llama_cpp_crash_is_reported_not_fatal():
    with pytest.raises(llamacpp.RuntimeCrash, match="SIGILL.*rebuild it portably"):
        llamacpp.run_isolated(_die_like_an_illegal_instruction)
    with pytest.raises(ValueError, match="a clear problem"):  # an ordinary error comes back as itself
        llamacpp.run_isolated(_fail_inside)
    assert llamacpp.run_isolated(sorted, [3, 1, 2]) == [1, 2, 3]


def test_a_child_that_dies_before_it_starts_is_reported_not_waited_for(monkeypatch, tmp_path):
    # A script that runs work at import (no `if __name__ == "__main__"`) kills the spawned child while it re-imports
    # the script, before it takes its end of the pipe: waiting on the pipe alone hung there forever.
    script = tmp_path / "no_main_guard.py"
    script.write_text("raise SystemExit(3)\n")
    main = types.ModuleType("__main__")
    main.__file__, main.__spec__ = str(script), None
    monkeypatch.setitem(sys.modules, "__main__", main)
    with pytest.raises(llamacpp.RuntimeCrash, match="exited with code 3 before it answered"):
        llamacpp.run_isolated(sorted, [3, 1, 2])


def test_llama_with_attention_biases_converts_exactly():
    model = tiny_model("llama-bias")
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    original = copy.deepcopy(model)
    convert(model, Plan(selection="high", rope_pairs=8), stats_for(model))  # every pair, full rank: exact
    ids = prompt()
    with torch.no_grad():
        assert (model(ids).logits - original(ids).logits).abs().max() < 1e-4
    assert model.config.mla["o_bias"] and model.config.mla["qkv_bias"]


def test_llama_with_attention_biases_through_the_cli(tmp_path, capsys):
    folder = tmp_path / "llama-bias"
    tiny_model("llama-bias").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 90 + 3}" for i in range(2000)))
    code = cli.main(["convert", "-m", str(folder), "-o", str(tmp_path / "mla"), "--latent", "16",
                     "--calib-windows", "2", "--calib-length", "32", "--text", str(text)])
    assert code == 0, capsys.readouterr().err


def test_default_build_folder_keeps_the_whole_model_name():
    assert commands.default_out("Qwen/Qwen2.5-0.5B-Instruct", "rpi5") == "build-Qwen2.5-0.5B-Instruct-rpi5"
    assert commands.default_out("/models/Llama-3.2-1B.Q4_0.gguf", "pi") == "build-Llama-3.2-1B.Q4_0-pi"
    assert commands.default_out("smollm2-135m", "rpi5") == "build-smollm2-135m-rpi5"


def test_every_option_has_help_and_the_cli_has_a_version(capsys):
    def options(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from options(p, f"{name} {sub}")
            elif action.dest != "help":
                yield name, action

    missing = [f"{name} {a.option_strings or a.dest}" for name, a in options(cli.build_parser(), "edge-mla")
               if not a.help]
    assert not missing
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("edge-mla ")


def test_budget_exits_with_the_documented_code_when_it_does_not_fit(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(folder)
    devices = tmp_path / "tiny.toml"
    devices.write_text('[speck]\nname = "Speck"\nram_mb = 1.5\nusable_mb = 1.0\nbandwidth_gbs = 1.0\ncpu = "none"\n'
                       'runtimes = ["llama.cpp"]\nsource = "a made-up device for this test, far too small"\n')
    assert cli.main(["budget", str(folder), "--device", "rpi5", "--context", "256"]) == 0
    capsys.readouterr()
    code = cli.main(["budget", str(folder), "--device", "speck", "--devices", str(devices), "--context", "256"])
    assert code == cli.EXIT_DOES_NOT_FIT and "DOES NOT FIT" in capsys.readouterr().out


def test_run_of_an_onnx_export_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    from conftest import converted, export

    folder = export(converted("llama-gqa"), tmp_path / "onnx", weight_bits=32, kv_bits=32)
    code = ("import sys; from edge_mla import cli; "
            f"rc = cli.main(['run', {str(folder)!r}, '-p', 'w5 w6', '-n', '3', '--threads', '1']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

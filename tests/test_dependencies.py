"""The lower bounds in pyproject.toml: the installed packages have the APIs the code calls.

Each check names the oldest version that has the API; if pip ever resolves an older one (a user's
pinned environment), this fails with the reason instead of a TypeError deep inside a stage.
"""
import inspect

import torch


def test_open_clip_create_model_takes_weights_only():  # open_clip_torch >= 3.0 (pipeline/models.py)
    import open_clip

    assert "weights_only" in inspect.signature(open_clip.create_model).parameters


def test_open_clip_text_pool_takes_eos_token_id():  # open_clip_torch >= 3.1 (pipeline/text.py)
    from open_clip.transformer import text_global_pool

    assert "eos_token_id" in inspect.signature(text_global_pool).parameters


def test_torch_has_fused_sgd_on_cpu():  # torch >= 2.4 (stages/adapter/train.py)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5, momentum=0.9, fused=True)
    w.sum().backward()
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), 0.5))


def test_fsspec_pipe_file_creates_only_if_absent():  # fsspec >= 2024.12 (store/location.py: the lock object)
    import fsspec

    assert "mode" in inspect.signature(fsspec.AbstractFileSystem.pipe_file).parameters


def test_dvclive_has_the_repository_hook_that_pipeline_live_replaces():  # dvclive 3.x (pipeline/live.py)
    from dvclive import Live

    assert callable(Live._init_dvc) and "dvcyaml" in inspect.signature(Live).parameters

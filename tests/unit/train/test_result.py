"""finetune.train.result: what a training leaves in RUN/train_result.json round-trips through a dict."""

from finetune.train.result import TrainResult


def test_a_result_read_back_from_its_dict_is_the_same_result():
    result = TrainResult("run", "run/adapter", None, steps=12, start_step=4, peak_memory_bytes=7)
    result.extra["shortcuts"] = "prefix cache off"
    assert TrainResult(**result.to_dict()) == result

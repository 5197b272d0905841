"""Sample prompt files (kohya syntax) and trigger handling."""

from pathlib import Path

import pytest

from training.errors import ConfigError
from training.prompts import SamplePrompt, load_prompt_file, strip_trigger

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_options_comments_and_defaults(tmp_path):
    path = write(tmp_path, "# a comment\n\n"
                           "a cat, sitting --n lowres, blurry --w 640 --h 384 --d 7 --s 20 --l 5.5 --ss euler_a\n"
                           "   \n"
                           "a dog\n")
    first, second = load_prompt_file(path, None)
    assert first == SamplePrompt(index=0, prompt="a cat, sitting", negative_prompt="lowres, blurry", width=640,
                                 height=384, seed=7, steps=20, scale=5.5, sampler="euler_a")
    assert second == SamplePrompt(index=1, prompt="a dog")
    assert (second.width, second.height, second.seed, second.steps, second.scale) == (512, 512, None, 30, 7.5)


def test_trigger_placeholder_is_replaced_in_prompt_and_negative(tmp_path):
    path = write(tmp_path, "{trigger}, standing --n not {trigger} --d 1\n")
    (sample,) = load_prompt_file(path, "ohwx woman")
    assert sample.prompt == "ohwx woman, standing"
    assert sample.negative_prompt == "not ohwx woman"


def test_trigger_placeholder_without_trigger_names_file_line_and_fix(tmp_path):
    path = write(tmp_path, "# header\n{trigger}, standing\n")
    with pytest.raises(ConfigError) as err:
        load_prompt_file(path, None)
    message = str(err.value)
    assert f"{path}:2" in message and "metadata_trigger_phrase" in message and "\n" not in message


@pytest.mark.parametrize("line, fragment", [
    ("a cat --w abc", "--w 'abc'"),
    ("a cat --w 500", "multiple of 8"),
    ("a cat --s 0", "1 to 1000"),
    ("a cat --l -2", "--l"),
    ("a cat --d", "give a value"),
    ("a cat --q 3", "unknown option --q"),
    (" --w 512", "no prompt"),
])
def test_bad_option_names_file_and_line(tmp_path, line, fragment):
    path = write(tmp_path, "first prompt\n" + line + "\n")
    with pytest.raises(ConfigError) as err:
        load_prompt_file(path, None)
    assert f"{path}:2" in str(err.value)
    assert fragment in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="not found.*sample_prompts"):
        load_prompt_file(tmp_path / "nope.txt", "x")
    with pytest.raises(ConfigError, match="has no prompts"):
        load_prompt_file(write(tmp_path, "# only a comment\n\n"), "x")


def test_shipped_prompt_file_loads():
    prompts = load_prompt_file(REPO / "prompts" / "character.txt", "ohwx")
    assert len(prompts) >= 4
    assert all(p.prompt.startswith("ohwx, ") and p.seed is not None for p in prompts)
    assert [p.index for p in prompts] == list(range(len(prompts)))


@pytest.mark.parametrize("prompt, trigger, expected", [
    ("ohwx, a 3d character, standing", "ohwx", "a 3d character, standing"),
    ("a photo of OHWX woman,  smiling ,", "ohwx woman", "a photo of, smiling"),
    ("ohwxy and ohwx", "ohwx", "ohwxy and"),  # whole words only
    ("sks, ohwx, a cat", "ohwx, sks", "a cat"),
    ("a cat,, sitting", None, "a cat, sitting"),
    ("{trigger}, a cat", None, "a cat"),
])
def test_strip_trigger(prompt, trigger, expected):
    assert strip_trigger(prompt, trigger) == expected


def test_shipped_validation_prompts_cover_thirty_cases_with_the_trigger():
    prompts = load_prompt_file(REPO / "prompts" / "validation.txt", "ohwx")
    assert len(prompts) == 30
    assert all(p.prompt.startswith("ohwx, ") and p.negative_prompt for p in prompts)
    assert len({p.seed for p in prompts}) == 30 and len({p.prompt for p in prompts}) == 30
    assert all((p.width, p.height, p.steps) == (512, 512, 28) for p in prompts)

"""The README's main command in its fast form, end to end: every stage runs and the summary is complete."""

import re

from tools import quickstart
from tools.quickstart_report import SECTIONS, all_finite, summary_numbers


def test_fast_quickstart_end_to_end_and_reuse(tmp_path, capsys):
    summary = quickstart.main(["--fast", "--outputs", str(tmp_path)])
    run_dir = summary.parent
    text = summary.read_text()
    numbers = summary_numbers(run_dir)
    assert set(numbers) == {name for name, _ in SECTIONS}
    assert all_finite(numbers), numbers
    for _, title in SECTIONS:
        assert f"## {title}" in text
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert any("generation" in p for p in pictures) and any("reconstruction" in p for p in pictures)
    for picture in pictures:
        assert (run_dir / picture).is_file(), picture
    assert "RANDOM" in capsys.readouterr().out  # the built-in teachers are reported as random
    stages = tmp_path / "quickstart-fast"
    assert (stages / "tokenizer_text" / "tokenizer" / "config.json").is_file()
    assert (stages / "lm" / "model" / "config.json").is_file()

    again = quickstart.main(["--fast", "--outputs", str(tmp_path)])  # finished stages are reused
    out = capsys.readouterr().out
    assert again != summary and out.count("reusing") == 5, out

"""key_lines: the line of every key path in a TOML text tomllib accepted."""

import tomllib

from telefuser.compiler.recipe_lines import key_lines, line_of

TEXT = '''# comment = not a key
name = "a = b # not a comment"
[layer1]
dtype.value = "bf16"
[[layer1.models]]
name = "dit"
path = "x"
[[layer1.models]]
name = "vae"
opts = { tiled = true, tile = [1, 2] }
[layer2]
steps = 3.5
prompts = [
  "one",
  "two",
]
text = """
fake = 1
"""
after = 1
'''


def test_lines_of_tables_dotted_inline_arrays_and_strings():
    tomllib.loads(TEXT)
    lines = key_lines(TEXT)
    assert lines[("name",)] == 2
    assert lines[("layer1", "dtype", "value")] == 4
    assert lines[("layer1", "models", "0", "path")] == 7
    assert lines[("layer1", "models", "1", "name")] == 9
    assert lines[("layer1", "models", "1", "opts", "tile", "1")] == 10
    assert lines[("layer2", "steps")] == 12
    assert lines[("layer2", "prompts", "1")] == 15
    assert lines[("layer2", "after")] == 20
    assert ("layer2", "fake") not in lines and ("comment",) not in lines
    assert line_of(lines, ("layer1", "models", "1", "missing")) == 8

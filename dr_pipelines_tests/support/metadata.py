"""Reading Dagster metadata values in assertions.

`MetadataValue.value` is typed as any packable value; these narrow it to what an assertion
compares it with, and fail (as the comparison would) when it is something else."""


def number(value: object) -> float:
    """A metadata value compared as a number (an int or a float)."""
    assert isinstance(value, (int, float)), f"expected a number, got {value!r}"
    return value


def text(value: object) -> str:
    """A metadata value compared or searched as text (plain text or markdown)."""
    assert isinstance(value, str), f"expected text, got {value!r}"
    return value

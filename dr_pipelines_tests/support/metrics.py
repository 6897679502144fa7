"""Reading Prometheus text exposition in assertions."""

from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"metric {name}{labels} not found")

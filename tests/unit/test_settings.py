"""Stack settings from the environment."""
import pytest


def test_a_bad_port_in_the_environment_is_a_clear_error():
    from infra.settings import StackSettings

    with pytest.raises(ValueError, match="FEEDBEAM_KAFKA_PORT='x9' is not a valid number"):
        StackSettings.from_env({"FEEDBEAM_KAFKA_PORT": "x9"})
    assert StackSettings.from_env({"FEEDBEAM_KAFKA_PORT": "9192"}).kafka_bootstrap.endswith(":9192")

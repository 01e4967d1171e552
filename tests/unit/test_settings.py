"""Stack settings from the environment."""
import pytest


def test_a_bad_port_in_the_environment_is_a_clear_error():
    from infra.settings import StackSettings

    with pytest.raises(ValueError, match="FEEDBEAM_KAFKA_PORT='x9' is not a valid number"):
        StackSettings.from_env({"FEEDBEAM_KAFKA_PORT": "x9"})
    assert StackSettings.from_env({"FEEDBEAM_KAFKA_PORT": "9192"}).kafka_bootstrap.endswith(":9192")


def test_cassandra_yields_to_the_api_unless_told_otherwise():
    from infra.settings import StackSettings

    assert StackSettings.from_env({}).cassandra_nice == 10
    assert StackSettings.from_env({"FEEDBEAM_CASSANDRA_NICE": "0"}).cassandra_nice == 0
    with pytest.raises(ValueError, match="FEEDBEAM_CASSANDRA_NICE=20: a niceness from 0 to 19"):
        StackSettings.from_env({"FEEDBEAM_CASSANDRA_NICE": "20"})

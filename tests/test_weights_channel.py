"""The weights channel: each collector slot is sent every published version once, and a new
actor in a slot gets the newest weights with its first call."""

from __future__ import annotations

from deploy.run.weights import WeightsChannel


def test_nothing_is_sent_before_the_first_publish() -> None:
    ch = WeightsChannel()
    assert ch.latest() == (0, None)
    assert not ch.needs(0)
    assert ch.take(0) is None


def test_each_version_is_sent_to_each_slot_once() -> None:
    ch = WeightsChannel()
    ch.publish(3, "ref3")
    assert ch.latest() == (3, "ref3")
    assert ch.needs(0) and ch.needs(1)
    assert ch.take(0) == "ref3"
    assert not ch.needs(0) and ch.take(0) is None
    assert ch.needs(1)  # slot 1 was not sent anything yet
    ch.publish(5, "ref5")
    assert ch.needs(0)
    assert ch.take(0) == "ref5" and ch.take(1) == "ref5"
    assert ch.take(0) is None and ch.take(1) is None


def test_sent_records_the_version_a_slot_holds() -> None:
    ch = WeightsChannel()
    ch.publish(4, "ref4")
    ch.sent(2, 4)
    assert not ch.needs(2)
    ch.sent(2, 3)  # it holds an older version: the newest is due again
    assert ch.needs(2)


def test_a_replaced_slot_gets_the_newest_weights_again() -> None:
    ch = WeightsChannel()
    ch.publish(7, "ref7")
    assert ch.take(0) == "ref7"
    ch.forget(0)  # a new actor in slot 0 holds no weights
    assert ch.needs(0) and ch.take(0) == "ref7"
    assert ch.take(0) is None


def test_a_restored_learner_publishing_its_version_again_is_not_resent() -> None:
    ch = WeightsChannel()
    ch.publish(9, "ref9")
    ch.take(0)
    ch.publish(9, "ref9-again")  # the same version: slot 0 already holds these weights
    assert not ch.needs(0)
    assert ch.latest() == (9, "ref9-again")


def test_weights_of_a_dead_owner_are_not_sent_but_their_version_stays() -> None:
    ch = WeightsChannel()
    ch.publish(4, "ref4")
    assert ch.take(0) == "ref4"
    ch.owner_died()
    assert ch.version == 4 and not ch.needs(1) and ch.take(1) is None
    ch.publish(4, "ref4-again")  # a restored learner republishes the version collectors hold
    assert ch.take(0) is None and ch.take(1) == "ref4-again"

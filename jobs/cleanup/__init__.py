"""``mlwarden cleanup``: remove old experiment artifacts, behind safety breakers.

The whole plan is built first (:mod:`.plan`), checked against the breakers, and only then
executed (:mod:`.delete`) through directory file descriptors, so that nothing outside the
configured roots can be reached even if the tree changes while the job runs.
"""

"""Studies that run many trainings and collect one table: :mod:`mona_sfl.studies.split_depth`
(MonAcoSFL vs MocoSFL over cut layers; ``mona-sfl study``)."""

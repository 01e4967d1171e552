"""Pure decision logic of each pipeline: no I/O, no Beam; tested as plain functions."""

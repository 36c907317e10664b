"""The pipeline: stages as a DAG (dag), fingerprints and skip decisions (cache), run records
(record), the runner that executes stages through a launch backend (runner), and exports of
the project to schedulers, CI systems and deployments (exports/)."""

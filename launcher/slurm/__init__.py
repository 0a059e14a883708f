"""The fleet as a SLURM job (`vllm-fleet slurm`, `status --job`, `down --job`).

``settings`` is fleet.yaml's ``slurm:`` section (what differs between sites), ``layout`` picks
the job's shape from the planner (replicas on every node, or one model across nodes with Ray),
``script`` renders the sbatch script from both (pure text), ``agent`` runs inside the job (the
steps a shell does badly: waiting, counting Ray nodes, writing the endpoint file), and ``job``
reads a submitted job back from SLURM and its endpoint file.
"""

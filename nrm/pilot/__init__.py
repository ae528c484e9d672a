"""`nrm pilot`: many small tasks inside one allocation, on nrmd slices.

A replacement for QCG-PilotJob that reads its request files (docs/pilot.md).
Pure parts: jobfile (requests), model (jobs, iterations, variables), graph
(dependencies), scheduler (cores); runner drives them over nrm.client.
"""

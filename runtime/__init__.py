"""The runtime: runners for the deployment backends and the chain of the four engines
read from a build's ``manifest.json``."""

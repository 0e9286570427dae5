"""Query/Retrieve SCP: planning systems and viewers find and pull what the node holds."""

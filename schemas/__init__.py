"""The contracts of sluice: Arrow schemas of every input and output.

Nothing here imports the rest of sluice; everything else imports this. A change to a schema is a
change to a contract with users' tables, so each one carries a version.
"""

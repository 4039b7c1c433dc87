"""The lab board: a local web app over run records, reports, live training, launching and chat
(`forgelab board`)."""

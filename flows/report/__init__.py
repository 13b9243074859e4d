"""What shows a build's result: the data-mix report (mix) and its page (page), the seeded
gallery, the build history, the Data Docs made to open offline (datadocs), and what the
terminal prints (tables, terminal). May import schemas and storage only."""

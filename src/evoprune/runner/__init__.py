"""Running searches: the configuration (:mod:`.config`, :mod:`.sections`), the one ask -> evaluate -> tell
loop (:mod:`.loop`), what each search space means for a model (:mod:`.problems`), run directories as storage
(:mod:`.rundir`), the pruned model of a finished run (:mod:`.pruned`) and Ray workers (:mod:`.distributed`).
Imports nothing eagerly, so that parsing a configuration never loads torch."""

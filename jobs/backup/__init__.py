"""Model backups that are proven restorable: ``mlwarden backup`` and ``mlwarden restore``.

One concept per module: ``archive`` writes an archive in one pass, ``tarstream`` reads one
back with strict member checks, ``verify`` proves an archive matches its manifest,
``offsite`` copies backups to S3, ``retention`` decides what to keep, ``restore`` puts a
backup back, ``job`` runs a backup, a restore or a drill, ``cli`` the settings.
"""

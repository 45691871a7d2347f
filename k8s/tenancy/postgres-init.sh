# Sourced by the postgres image's entrypoint (/docker-entrypoint-initdb.d) once, when it initialises an empty
# data directory: the app's role `clip`, owner of database `clip`, no superuser, with the password of the Secret
# clip-tenancy's key database-password (the one in its database-url). tests/integration/test_services.py runs it
# against a real PostgreSQL.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
  --set password="$(cat "$CLIP_DATABASE_PASSWORD_FILE")" <<'SQL'
CREATE ROLE clip LOGIN PASSWORD :'password';
CREATE DATABASE clip OWNER clip;
SQL

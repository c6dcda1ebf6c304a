-- Run once by the postgres image on the first start of an empty data volume
-- (/docker-entrypoint-initdb.d): one database for MLflow, one for Optuna, both owned by
-- POSTGRES_USER. Guarded, so it also works when POSTGRES_USER is itself `mlflow` or `optuna`.
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')
\gexec
SELECT 'CREATE DATABASE optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')
\gexec

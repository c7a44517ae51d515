-- One PostgreSQL server, one database per service (owned by POSTGRES_USER, who runs this script).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

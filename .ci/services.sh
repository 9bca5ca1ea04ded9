# Sourced by .ci/run (and usable by hand: `. .ci/services.sh && start_postgres`): Debian's
# packages for the tests, and PostgreSQL for the MLflow server tests (tests/test_server*.py).

install_debian_packages() {
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

PG_STARTED_HERE=""
start_postgres() {
  # Debian's cluster listens on localhost only; the test database is created afresh each time, and
  # the test role may create more (each server test module makes fresh ones).
  local version port
  version=$(ls /etc/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
    pg_ctlcluster "$version" main start
    PG_STARTED_HERE="$version"
  fi
  su postgres -c "psql -q -v ON_ERROR_STOP=1" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dae_test') THEN
    CREATE ROLE dae_test LOGIN PASSWORD 'dae_test';
  END IF;
END $$;
ALTER ROLE dae_test CREATEDB;
DROP DATABASE IF EXISTS dae_mlflow_test;
CREATE DATABASE dae_mlflow_test OWNER dae_test;
SQL
  port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
  DAE_TEST_POSTGRES_URI="postgresql+psycopg://dae_test:dae_test@127.0.0.1:$port/dae_mlflow_test"
  # How tests/test_server_faults.py stops PostgreSQL under a running server, and starts it again.
  DAE_TEST_POSTGRES_CTL="pg_ctlcluster $version main"
  echo "PostgreSQL $version on 127.0.0.1:$port, database dae_mlflow_test"
}

stop_postgres() {
  if [ -n "$PG_STARTED_HERE" ]; then
    pg_ctlcluster "$PG_STARTED_HERE" main stop || true
  fi
}

#!/usr/bin/env bash
# Makes sure the real servers the tests talk to are up: PostgreSQL on 127.0.0.1:5432 with a
# database `test`, Redis on 127.0.0.1:6379, MariaDB on 127.0.0.1:3306 with a database `test`, and
# NATS with JetStream on 127.0.0.1:4222.
# RabbitMQ on 127.0.0.1:5672 (user guest/guest).
# Starts them if they are installed but stopped, installs them (Debian packages) if they are
# missing. Safe to run repeatedly. The TLS store tests (tests/tests/store_tls.rs) start servers of
# their own from the same packages: redis-server (Debian's is built with TLS), PostgreSQL's initdb
# and postgres, run as the postgres user, and MariaDB's mariadb-install-db and mariadbd, run as
# the mysql user.
set -uo pipefail

log() { echo "services: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  log "installing $*"
  as_root apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null 2>&1 || log "could not install $*"
}

# --- Redis -------------------------------------------------------------------------------
if [ -z "${IDEMPOTENT_TEST_REDIS_URL:-}" ]; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools
    if command -v redis-server >/dev/null 2>&1; then
      log "starting redis-server on 6379"
      redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null 2>&1 || true
      for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    fi
  fi
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && log "redis is up" || log "redis is NOT available"
fi

# --- PostgreSQL --------------------------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }
if [ -z "${IDEMPOTENT_TEST_DATABASE_URL:-}" ]; then
  if ! pg_up; then
    [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql 2>/dev/null)" ] || apt_install postgresql postgresql-client
    if [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
      ver=$(ls /etc/postgresql | sort -V | tail -n 1)
      log "starting PostgreSQL $ver"
      as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start >/dev/null 2>&1 || true
      for _ in $(seq 1 100); do pg_up && break; sleep 0.1; done
    fi
  fi
  if pg_up; then
    # A fresh Debian install answers only with passwords over TCP: give the tests a role and a
    # database they can use, and tell them the URL.
    if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
      as_root su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
      as_root su postgres -c "createdb test" >/dev/null 2>&1 || true
      if PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
        echo "IDEMPOTENT_TEST_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/test"
      fi
    fi
    log "postgres is up"
  else
    log "postgres is NOT available"
  fi
fi

# --- MariaDB -----------------------------------------------------------------------------
mysql_client() { if command -v mariadb >/dev/null 2>&1; then mariadb "$@"; else mysql "$@"; fi; }
mysql_up() { mysql_client -h 127.0.0.1 -P 3306 -u "$1" ${2:+-p"$2"} -e 'select 1' >/dev/null 2>&1; }
mariadbd_installed() { command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; }
if [ -z "${IDEMPOTENT_TEST_MYSQL_URL:-}" ]; then
  if ! mysql_up root && ! mysql_up idempotent idempotent; then
    mariadbd_installed || apt_install mariadb-server mariadb-client
    if mariadbd_installed; then
      log "starting MariaDB"
      as_root service mariadb start >/dev/null 2>&1 || as_root /etc/init.d/mariadb start >/dev/null 2>&1 || true
      for _ in $(seq 1 100); do
        { mysql_up root || mysql_up idempotent idempotent; } && break
        # Debian's root logs in through the unix socket only: the test user is made over it.
        as_root mariadb -u root -e 'select 1' >/dev/null 2>&1 && break
        sleep 0.1
      done
    fi
  fi
  if mysql_up root; then
    mysql_client -h 127.0.0.1 -P 3306 -u root -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null 2>&1 || true
    log "mariadb is up"
  elif mysql_up idempotent idempotent || as_root mariadb -u root -e 'select 1' >/dev/null 2>&1; then
    # A fresh Debian install lets root in through the unix socket only: give the tests a user of
    # their own over TCP (it creates and drops a database per test) and tell them the URL.
    as_root mariadb -u root -e "CREATE USER IF NOT EXISTS 'idempotent'@'127.0.0.1' IDENTIFIED BY 'idempotent';
      GRANT ALL PRIVILEGES ON *.* TO 'idempotent'@'127.0.0.1' WITH GRANT OPTION;
      CREATE DATABASE IF NOT EXISTS test;" >/dev/null 2>&1 || true
    if mysql_up idempotent idempotent; then
      echo "IDEMPOTENT_TEST_MYSQL_URL=mysql://idempotent:idempotent@127.0.0.1:3306/test"
      log "mariadb is up"
    else
      log "mariadb is NOT available"
    fi
  else
    log "mariadb is NOT available"
  fi
fi
# --- NATS with JetStream ----------------------------------------------------------------
# The consumer tests (tests/tests/nats.rs, the payments worker's) need JetStream on 4222.
nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) >/dev/null 2>&1; }
if [ -z "${IDEMPOTENT_TEST_NATS_URL:-}" ]; then
  if ! nats_up; then
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || apt_install nats-server
    nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    if [ -x "$nats_bin" ]; then
      log "starting nats-server with JetStream on 4222"
      mkdir -p /tmp/idempotent-nats-js
      nohup "$nats_bin" -js -a 127.0.0.1 -p 4222 -sd /tmp/idempotent-nats-js >/tmp/idempotent-nats.log 2>&1 &
      for _ in $(seq 1 50); do nats_up && break; sleep 0.1; done
    fi
  fi
  nats_up && log "nats is up" || log "nats is NOT available"
fi

# --- RabbitMQ ----------------------------------------------------------------------------
# The RabbitMQ consumer tests (tests/tests/rabbitmq.rs, examples/payments/tests/worker_amqp.rs)
# need a broker on 5672 with the default guest user (allowed from loopback only).
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) >/dev/null 2>&1; }
if [ -z "${IDEMPOTENT_TEST_AMQP_URL:-}" ]; then
  if ! amqp_up; then
    command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
    if [ -d /etc/rabbitmq ]; then
      # Listen on loopback only, and name the node after localhost: a container's hostname may
      # not resolve, and then the broker does not start.
      grep -q '^listeners.tcp' /etc/rabbitmq/rabbitmq.conf 2>/dev/null ||
        echo 'listeners.tcp.local = 127.0.0.1:5672' | as_root tee -a /etc/rabbitmq/rabbitmq.conf >/dev/null
      grep -q '^NODENAME' /etc/rabbitmq/rabbitmq-env.conf 2>/dev/null ||
        printf 'NODENAME=rabbit@localhost\nERL_EPMD_ADDRESS=127.0.0.1\n' | as_root tee -a /etc/rabbitmq/rabbitmq-env.conf >/dev/null
      log "starting rabbitmq-server on 5672"
      as_root service rabbitmq-server restart >/dev/null 2>&1 || as_root rabbitmq-server -detached >/dev/null 2>&1 || true
      for _ in $(seq 1 600); do amqp_up && break; sleep 0.1; done
    fi
  fi
  amqp_up && log "rabbitmq is up" || log "rabbitmq is NOT available"
fi

# --- network namespaces and packet filters -------------------------------------------------
# examples/payments/tests/dropped_packets.rs puts Redis and PostgreSQL on hosts of their own (network
# namespaces, `ip netns`), drops their packets with nftables (`nft`) and slows their link with
# `tc`. It needs root; without these tools it skips loudly, and fails under CI=true.
if ! command -v nft >/dev/null 2>&1 && ! [ -x /usr/sbin/nft ]; then apt_install nftables; fi
if ! command -v tc >/dev/null 2>&1 && ! [ -x /usr/sbin/tc ]; then apt_install iproute2; fi
{ command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ]; } && log "nftables is installed" || log "nftables is NOT available"

# --- schemathesis ------------------------------------------------------------------------
# examples/payments/tests/openapi.rs runs it (python3 -m schemathesis.cli, or $PYTHON) against
# both demo binaries; it skips loudly without it, and fails under CI=true.
python=${PYTHON:-python3}
st_up() { "$python" -m schemathesis.cli --version >/dev/null 2>&1; }
if ! st_up; then
  command -v "$python" >/dev/null 2>&1 || apt_install python3
  "$python" -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing schemathesis 4 (PyPI)"
  pip_install() { "$python" -m pip install --quiet --disable-pip-version-check "$@" 'schemathesis>=4,<5' >/dev/null 2>&1; }
  # A distribution's own Python refuses to install into itself (PEP 668) unless told to.
  pip_install || pip_install --break-system-packages || true
fi
st_up && log "schemathesis is installed" || log "schemathesis is NOT available"
# --- a real browser ------------------------------------------------------------------------
# examples/payments/tests/checkout_browser.rs drives headless Chromium through chromedriver (both
# from Debian's packages; tests/src/browser.rs installs them too when missing). It skips loudly
# without them, and fails under CI=true.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium chromium-driver
fi
command -v chromedriver >/dev/null 2>&1 && log "chromium and chromedriver are installed" || log "chromium is NOT available"

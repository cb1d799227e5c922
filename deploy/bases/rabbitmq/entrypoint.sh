#!/bin/sh
# Debian's rabbitmq-server, configured from the same variables as the official image.
set -eu
conf=/etc/rabbitmq/conf.d/10-defaults.conf
mkdir -p /etc/rabbitmq/conf.d
{
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  echo "loopback_users = none"
  [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER"
  [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS"
  true
} > "$conf"
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq
exec runuser -u rabbitmq -- "$@"

#!/usr/bin/env bash
# Credentials of a fedrad consortium: a consortium CA, the SuperLink's TLS certificate and one
# SuperNode key pair per site (OpenSSH ECDSA P-384, the format Flower's node authentication reads).
#
#   bash deploy/make-credentials.sh OUT_DIR [--host NAME_OR_IP]... [--site SITE]... [--days N] [--new-ca]
#
#   OUT_DIR/ca.key  ca.crt                      consortium CA (ca.key never leaves the coordinator)
#   OUT_DIR/superlink.key  superlink.pem         SuperLink (and nginx) certificate; SANs: localhost,
#                                                127.0.0.1, ::1 and every --host
#   OUT_DIR/sites/SITE/SITE.key  SITE.pub        the site's private key (for the hospital) and public key
#                                                (`fedrad coordinator register SITE SITE.pub`)
#   OUT_DIR/package-signing.key  .pub            Ed25519 key pair the coordinator signs model packages with
#                                                (`fedrad coordinator run --sign-key`); every hospital gets
#                                                the .pub (`fedrad validate --trust package-signing.pub`)
#
# Safe to run again: an existing CA is kept (pass --new-ca to replace it, which also re-issues the
# SuperLink certificate), the SuperLink certificate is re-issued only when the --host list changes
# or it expires within 30 days (only then is ca.key needed, so it may be kept offline in between),
# and an existing site key or package-signing key is never replaced (hospitals may already hold
# its public half).
set -euo pipefail
umask 077

usage() { sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "make-credentials: $*" >&2; exit 2; }

OUT="" ; HOSTS=() ; SITES=() ; DAYS=825 ; CA_DAYS=3650 ; NEW_CA=0
while [ $# -gt 0 ]; do
  case "$1" in
    --host) [ $# -ge 2 ] || die "--host needs a value"; HOSTS+=("$2"); shift 2 ;;
    --site) [ $# -ge 2 ] || die "--site needs a value"; SITES+=("$2"); shift 2 ;;
    --days) [ $# -ge 2 ] || die "--days needs a value"; DAYS="$2"; shift 2 ;;
    --new-ca) NEW_CA=1; shift ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$OUT" ] || die "one OUT_DIR only ('$OUT' and '$1')"; OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || usage 2
[[ "$DAYS" =~ ^[0-9]+$ ]] && [ "$DAYS" -gt 0 ] || die "--days must be a positive number of days, not '$DAYS'"
command -v openssl >/dev/null || die "openssl is not installed"
if [ ${#SITES[@]} -gt 0 ]; then command -v ssh-keygen >/dev/null || die "ssh-keygen is not installed (openssh-client)"; fi
for site in ${SITES[@]+"${SITES[@]}"}; do
  [[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "site name '$site': use letters, digits, '.', '_' and '-'"
done
for host in ${HOSTS[@]+"${HOSTS[@]}"}; do
  [[ "$host" =~ ^[A-Za-z0-9.:*_-]+$ ]] || die "host '$host' is not a DNS name or an IP address"
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --- consortium CA ----------------------------------------------------------------------------
if [ "$NEW_CA" = 0 ] && { [ -e "$OUT/ca.key" ] || [ -e "$OUT/ca.crt" ]; }; then
  [ -s "$OUT/ca.crt" ] || die "$OUT/ca.key exists but ca.crt does not; restore it, or pass --new-ca"
  echo "CA: keeping $OUT/ca.crt (pass --new-ca to replace it; every site then needs the new ca.crt)"
  NEW_SERVER=0
else
  [ "$NEW_CA" = 0 ] || echo "CA: --new-ca: replacing $OUT/ca.crt and re-issuing the SuperLink certificate"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$TMP/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$TMP/ca.key" -sha384 -days "$CA_DAYS" -subj "/O=fedrad consortium/CN=fedrad consortium CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$TMP/ca.crt"
  mv "$TMP/ca.key" "$OUT/ca.key"; mv "$TMP/ca.crt" "$OUT/ca.crt"
  echo "CA: created $OUT/ca.crt (valid $CA_DAYS days)"
  NEW_SERVER=1
fi

# --- SuperLink certificate ----------------------------------------------------------------------
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in ${HOSTS[@]+"${HOSTS[@]}"}; do
  case "$host" in
    localhost|127.0.0.1|::1) continue ;;
  esac
  if [[ "$host" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || [[ "$host" == *:* ]]; then
    san="$san,IP:$host"
  else
    san="$san,DNS:$host"
  fi
done
ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=$san"
if [ -s "$OUT/superlink.pem" ] && [ "$NEW_SERVER" = 0 ] && \
   { [ ${#HOSTS[@]} -eq 0 ] || [ "$(cat "$OUT/superlink.ext" 2>/dev/null)" = "$ext" ]; } && \
   openssl verify -CAfile "$OUT/ca.crt" "$OUT/superlink.pem" >/dev/null 2>&1 && \
   openssl x509 -in "$OUT/superlink.pem" -noout -checkend $((30 * 86400)) >/dev/null; then
  echo "SuperLink: keeping $OUT/superlink.pem ($(sed -n 's/^subjectAltName=//p' "$OUT/superlink.ext" 2>/dev/null))"
else
  [ -s "$OUT/ca.key" ] || die "the SuperLink certificate needs (re)issuing (new hosts, or expiring within 30 days), \
but $OUT/ca.key is not here: put the CA key back for this run (or pass --new-ca to start a new CA)"
  primary="${HOSTS[0]:-localhost}"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$TMP/superlink.key" 2>/dev/null
  openssl req -new -key "$TMP/superlink.key" -subj "/O=fedrad consortium/CN=$primary" -out "$TMP/superlink.csr"
  printf '%s\n' "$ext" > "$TMP/superlink.ext"
  openssl x509 -req -in "$TMP/superlink.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -sha384 -extfile "$TMP/superlink.ext" \
    -out "$TMP/superlink.pem" 2>/dev/null
  openssl verify -CAfile "$OUT/ca.crt" "$TMP/superlink.pem" >/dev/null
  mv "$TMP/superlink.key" "$OUT/superlink.key"; mv "$TMP/superlink.pem" "$OUT/superlink.pem"
  mv "$TMP/superlink.ext" "$OUT/superlink.ext"
  echo "SuperLink: issued $OUT/superlink.pem for $san (valid $DAYS days)"
  [ ${#HOSTS[@]} -gt 0 ] || echo "  note: no --host given; hospitals can reach this SuperLink only as localhost"
fi

# --- per-site SuperNode keys --------------------------------------------------------------------
for site in ${SITES[@]+"${SITES[@]}"}; do
  dir="$OUT/sites/$site"
  if [ -e "$dir/$site.key" ]; then
    [ -s "$dir/$site.pub" ] || ssh-keygen -y -f "$dir/$site.key" > "$dir/$site.pub"
    echo "site $site: keeping $dir/$site.key"
    continue
  fi
  mkdir -p "$dir"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$TMP/$site"
  mv "$TMP/$site" "$dir/$site.key"; mv "$TMP/$site.pub" "$dir/$site.pub"
  echo "site $site: created $dir/$site.key and $site.pub"
done

# --- package-signing key (Ed25519) ---------------------------------------------------------------
if [ -e "$OUT/package-signing.key" ]; then
  openssl pkey -in "$OUT/package-signing.key" -noout 2>/dev/null || \
    die "$OUT/package-signing.key is not a readable private key; restore it (or remove it for a new one, which \
every hospital then needs)"
  [ -s "$OUT/package-signing.pub" ] || openssl pkey -in "$OUT/package-signing.key" -pubout -out "$OUT/package-signing.pub"
  echo "package signing: keeping $OUT/package-signing.key"
else
  openssl genpkey -algorithm ed25519 -out "$TMP/package-signing.key"
  openssl pkey -in "$TMP/package-signing.key" -pubout -out "$TMP/package-signing.pub"
  mv "$TMP/package-signing.key" "$OUT/package-signing.key"; mv "$TMP/package-signing.pub" "$OUT/package-signing.pub"
  echo "package signing: created $OUT/package-signing.key and package-signing.pub"
fi

chmod 700 "$OUT"
chmod 600 "$OUT/superlink.key" "$OUT/package-signing.key"
[ ! -e "$OUT/ca.key" ] || chmod 600 "$OUT/ca.key"
chmod 644 "$OUT/ca.crt" "$OUT/superlink.pem" "$OUT/package-signing.pub"
if [ -d "$OUT/sites" ]; then
  find "$OUT/sites" -type d -exec chmod 700 {} +
  find "$OUT/sites" -name '*.key' -exec chmod 600 {} +
  find "$OUT/sites" -name '*.pub' -exec chmod 644 {} +
fi

cat <<EOF

What goes where:
  stays at the coordinator, never copied:  $OUT/ca.key (may be kept offline between uses)
  the coordinator's SuperLink and nginx:   $OUT/superlink.pem, $OUT/superlink.key, $OUT/ca.crt
                                           fedrad coordinator start --credentials $OUT --database DB
  the coordinator's study runs (signing):  $OUT/package-signing.key (readable by the SuperLink's user)
                                           fedrad coordinator run ... --sign-key $OUT/package-signing.key
  every hospital (and anyone validating):  $OUT/package-signing.pub (public: check it came from you)
                                           fedrad validate --package PKG --trust package-signing.pub --store STORE
EOF
for site in ${SITES[@]+"${SITES[@]}"}; do
  cat <<EOF
  site $site:
    register at the coordinator:           fedrad coordinator register $site $OUT/sites/$site/$site.pub
    send to the hospital (securely), once: $OUT/ca.crt and $OUT/sites/$site/$site.key
                                           then delete $site.key here
    the hospital runs:                     fedrad site join --superlink HOST:PORT --ca ca.crt --key $site.key --store STORE
EOF
done

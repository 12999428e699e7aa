package console

import (
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
	"golang.org/x/time/rate"
)

// The password file holds one line: pbkdf2-sha256$ITERATIONS$SALT$HASH
// (salt and hash in hex). The password itself is never stored.
const (
	passwordScheme = "pbkdf2-sha256"
	// passwordIter: OWASP's 2023 figure for PBKDF2-HMAC-SHA256 is 600000;
	// a login costs one derivation (~0.2 s on a small VM at this count).
	passwordIter = 600000
)

// Cookie names.
const (
	sessionCookie = "doppel_console"
	loginCookie   = "doppel_login"
	// csrfHeader carries the session's CSRF token on every request that
	// changes something.
	csrfHeader = "X-CSRF-Token"
)

// sessionTTL bounds a session from its login.
const sessionTTL = 12 * time.Hour

// ErrBadLogin is a refused password or token.
var ErrBadLogin = errors.New("wrong password or token")

// HashPassword returns the password file line for password.
func HashPassword(password string) (string, error) {
	salt := make([]byte, 16)
	rand.Read(salt)
	key, err := pbkdf2.Key(sha256.New, password, salt, passwordIter, 32)
	if err != nil {
		return "", fmt.Errorf("hash password: %w", err)
	}
	return fmt.Sprintf("%s$%d$%s$%s", passwordScheme, passwordIter, hex.EncodeToString(salt), hex.EncodeToString(key)), nil
}

// parsePasswordLine splits a password file line.
func parsePasswordLine(line string) (iter int, salt, hash []byte, err error) {
	parts := strings.Split(strings.TrimSpace(line), "$")
	if len(parts) != 4 || parts[0] != passwordScheme {
		return 0, nil, nil, fmt.Errorf("password file: want %s$ITERATIONS$SALT$HASH", passwordScheme)
	}
	iter, err = strconv.Atoi(parts[1])
	if err != nil || iter < 1 || iter > maxPasswordIter {
		return 0, nil, nil, fmt.Errorf("password file: iterations %q: want 1 to %d", parts[1], maxPasswordIter)
	}
	salt, err1 := hex.DecodeString(parts[2])
	hash, err2 := hex.DecodeString(parts[3])
	if err1 != nil || err2 != nil || len(hash) == 0 || len(hash) > 64 {
		return 0, nil, nil, errors.New("password file: salt and hash must be hex (hash at most 64 bytes)")
	}
	return iter, salt, hash, nil
}

// maxPasswordIter bounds the work a password file may ask for.
const maxPasswordIter = 10_000_000

// checkPassword reports whether password matches the hash line.
func checkPassword(line, password string) bool {
	iter, salt, want, err := parsePasswordLine(line)
	if err != nil {
		return false
	}
	got, err := pbkdf2.Key(sha256.New, password, salt, iter, len(want))
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1
}

// NewPassword returns a random password: 20 characters of base32
// (100 bits).
func NewPassword() string {
	b := make([]byte, 13)
	rand.Read(b)
	return base32NoPad(b)[:20]
}

func base32NoPad(b []byte) string {
	const alphabet = "abcdefghijkmnpqrstuvwxyz23456789" // no l, o, 0, 1
	var out strings.Builder
	var acc uint32
	bits := 0
	for _, c := range b {
		acc = acc<<8 | uint32(c)
		bits += 8
		for bits >= 5 {
			bits -= 5
			out.WriteByte(alphabet[(acc>>bits)&31])
		}
	}
	return out.String()
}

// WritePasswordFile stores the hash of password at path (mode 0600).
func WritePasswordFile(path, password string) error {
	line, err := HashPassword(password)
	if err != nil {
		return err
	}
	if err := statefile.Write(path, []byte(line+"\n"), 0o600); err != nil {
		return fmt.Errorf("write password file: %w", err)
	}
	return nil
}

// session is a logged-in browser.
type session struct {
	id      string
	csrf    string
	who     string
	expires time.Time
}

// sessions are the console's logins, in memory: a restarted console
// asks for the password again.
type sessions struct {
	mu sync.Mutex
	m  map[string]*session
	// failures limits wrong logins: a burst of 5, then one per second,
	// for everyone (the password is checked only within the limit).
	failures *rate.Limiter
	now      func() time.Time
}

func newSessions() *sessions {
	return &sessions{m: map[string]*session{}, failures: rate.NewLimiter(rate.Every(time.Second), 5), now: time.Now}
}

func randomToken() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func (ss *sessions) create(who string) *session {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	now := ss.now()
	for id, s := range ss.m {
		if now.After(s.expires) {
			delete(ss.m, id)
		}
	}
	s := &session{id: randomToken(), csrf: randomToken(), who: who, expires: now.Add(sessionTTL)}
	ss.m[s.id] = s
	return s
}

// get returns the request's session (nil: none or expired).
func (ss *sessions) get(r *http.Request) *session {
	c, err := r.Cookie(sessionCookie)
	if err != nil || c.Value == "" {
		return nil
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.m[c.Value]
	if s == nil {
		return nil
	}
	if ss.now().After(s.expires) {
		delete(ss.m, c.Value)
		return nil
	}
	return s
}

func (ss *sessions) drop(id string) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	delete(ss.m, id)
}

// sameOrigin refuses a request another site made the browser send: its
// Origin (or, without one, its Referer) must be this console, and
// Sec-Fetch-Site, when the browser sends it, same-origin.
func sameOrigin(r *http.Request) error {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return fmt.Errorf("cross-site request (Sec-Fetch-Site %s)", site)
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		if ref := r.Header.Get("Referer"); ref != "" {
			u, err := url.Parse(ref)
			if err != nil {
				return errors.New("bad Referer")
			}
			origin = u.Scheme + "://" + u.Host
		}
	}
	if origin == "" || origin == "null" {
		if origin == "null" {
			return errors.New("opaque origin")
		}
		return nil // not a browser (curl, tests): the CSRF token decides
	}
	if origin != "https://"+r.Host {
		return fmt.Errorf("origin %s is not this console (https://%s)", origin, r.Host)
	}
	return nil
}

// csrfOK checks the request's CSRF token against the session's.
func csrfOK(r *http.Request, s *session) bool {
	got := r.Header.Get(csrfHeader)
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(s.csrf)) == 1
}

func setCookie(w http.ResponseWriter, name, value, path string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: path, MaxAge: maxAge, Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
}

// readPasswordLine reads the password file ("" when it has none).
func readPasswordLine(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read password file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

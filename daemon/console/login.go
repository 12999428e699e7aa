package console

import (
	"html/template"
	"net/http"

	"github.com/doppelha/doppel/daemon/tlspin"
)

var loginTmpl = template.Must(template.ParseFS(webFS, "web/login.html"))

type loginData struct {
	Token   string
	Error   string
	Version string
}

// loginPage shows the login form. Its hidden token matches a cookie set
// here (double submit): a login another site posts is refused.
func (c *Console) loginPage(w http.ResponseWriter, r *http.Request) {
	c.renderLogin(w, http.StatusOK, "")
}

func (c *Console) renderLogin(w http.ResponseWriter, status int, msg string) {
	securityHeaders(w)
	tok := randomToken()
	setCookie(w, loginCookie, tok, "/login", 600)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	loginTmpl.Execute(w, loginData{Token: tok, Error: msg, Version: c.opts.Version})
}

// login checks the console password or an agent's API token and starts a
// session.
func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		c.renderLogin(w, http.StatusBadRequest, "bad form")
		return
	}
	if err := sameOrigin(r); err != nil {
		c.renderLogin(w, http.StatusForbidden, "refused: "+err.Error())
		return
	}
	ck, err := r.Cookie(loginCookie)
	if err != nil || ck.Value == "" || !tlspin.Equal(ck.Value, r.PostForm.Get("login_token")) {
		c.renderLogin(w, http.StatusForbidden, "the login form expired: try again")
		return
	}
	secret := r.PostForm.Get("password")
	who, limited := c.authenticate(secret)
	if limited {
		c.renderLogin(w, http.StatusTooManyRequests, "too many wrong logins: wait a few seconds")
		return
	}
	if who == "" {
		c.log.Warn("console login refused", "remote", r.RemoteAddr)
		c.renderLogin(w, http.StatusUnauthorized, ErrBadLogin.Error())
		return
	}
	s := c.ss.create(who)
	setCookie(w, loginCookie, "", "/login", -1)
	setCookie(w, sessionCookie, s.id, "/", int(sessionTTL.Seconds()))
	c.log.Info("console login", "who", who, "remote", r.RemoteAddr)
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// authenticate returns who secret logs in as ("" when nobody): the
// console password, or the API token of a configured agent. Beyond a
// burst of wrong logins, nothing is checked until the limiter refills
// (limited).
func (c *Console) authenticate(secret string) (who string, limited bool) {
	if c.ss.failures.Tokens() < 1 {
		return "", true
	}
	if secret == "" {
		c.ss.failures.Allow()
		return "", false
	}
	if line, err := readPasswordLine(c.opts.PasswordFile); err == nil && line != "" && checkPassword(line, secret) {
		who = "admin"
	}
	if cfg := c.cfg.current(); cfg != nil {
		for _, s := range cfg.Servers {
			if tlspin.Equal(s.Token, secret) && who == "" {
				who = "token of " + s.Name
			}
		}
	}
	if who == "" {
		c.ss.failures.Allow() // count the failure
	}
	return who, false
}

// logout ends the session.
func (c *Console) logout(w http.ResponseWriter, r *http.Request, s *session) error {
	c.ss.drop(s.id)
	setCookie(w, sessionCookie, "", "/", -1)
	writeJSON(w, http.StatusOK, map[string]string{"status": "logged out"})
	return nil
}

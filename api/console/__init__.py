"""The web console at /console: a few static pages (HTML, CSS, JavaScript shipped in this package,
no CDN, no build step) over the JSON API.

    session.py   sign-in: a token in an HttpOnly, SameSite=Strict cookie; the cookie stands in for
                 the bearer header on /v1/* and /metrics; writes also need the CSRF header
    router.py    GET /console (the pages), /console/static/*, and /console/session (sign in, out)
    static/      index.html, console.css, console.js (charts are SVG drawn by console.js)

The pages read the same routes as any other client (api/routes/*.py), so what they show is what
`GET /v1/spend` and `sidecar status --json` answer.
"""

"""A local SMTP server (aiosmtpd) on 127.0.0.1 that records parsed messages.

with FakeSmtp() as smtp:
    ...send to ("127.0.0.1", smtp.port)...
    assert smtp.messages[0]["Subject"] == "..."
"""

import email
import email.policy
import socket
import threading
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def _free_port() -> int:
    # aiosmtpd's Controller connects to its own port to check readiness, so port 0 won't do.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeSmtp:
    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        """With `username`/`password`, the server advertises AUTH and checks that login.

        Login stays optional (aiosmtpd warns when AUTH is required without TLS); tests read
        `logins` to see whether the client logged in.
        """
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []  # (mail from, rcpt tos) per message
        self.logins: list[str] = []  # user names that logged in successfully
        self._credentials = (username, password)
        self._refuse = 0
        self._lock = threading.Lock()
        auth = {}
        if username is not None:
            auth = {"authenticator": self._authenticate, "auth_require_tls": False}
        self.port = _free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **auth)

    def refuse_next(self, count: int) -> None:
        """Answers "554 refused" to the next `count` messages."""
        with self._lock:
            self._refuse = count

    def start(self) -> "FakeSmtp":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "FakeSmtp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        with self._lock:
            if self._refuse > 0:
                self._refuse -= 1
                return "554 refused"
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if (user, password) == self._credentials:
                self.logins.append(user)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

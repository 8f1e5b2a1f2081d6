# One image for every program of the network (EV_Central, EV_CP_M, EV_CP_E, EV_Driver, EV_Registry, EV_W, EV_OCPP,
# EV_OCPP_SIM, evcharging).
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock setup.cfg pyproject.toml README.md ./
COPY actors actors
COPY transport transport
COPY persistence persistence
COPY supervisors supervisors
RUN pip install --no-cache-dir -c requirements.lock . && useradd -m ev && mkdir -p /data /credentials && chown ev /data /credentials
USER ev
ENV PYTHONUNBUFFERED=1
CMD ["EV_Central", "--help"]
